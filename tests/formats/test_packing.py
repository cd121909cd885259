"""Exhaustive packing tests against a slow pure-Python bit stream.

Layout (src/lowbit/packing.py): code ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``, least
significant bit first; stream bit ``k`` is bit ``k % 8`` of byte ``k // 8``; the last byte is
zero-padded.
"""
from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.packing import pack, packed_nbytes, unpack

BITS = range(1, 9)


def reference_pack(codes: list[int], bits: int) -> list[int]:
    stream = [(c >> j) & 1 for c in codes for j in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return [sum(stream[8 * k + j] << j for j in range(8)) for k in range(len(stream) // 8)]


def reference_unpack(data: list[int], bits: int, n: int) -> list[int]:
    stream = [(byte >> j) & 1 for byte in data for j in range(8)]
    return [sum(stream[i * bits + j] << j for j in range(bits)) for i in range(n)]


def background(n: int, bits: int) -> list[int]:
    """A deterministic code pattern that uses high and low bits."""
    return [(7 * i + 3) % 2**bits for i in range(n)]


def check(codes: list[int], bits: int) -> None:
    t = torch.tensor(codes, dtype=torch.uint8)
    packed = pack(t, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(len(codes), bits)
    assert packed.tolist() == reference_pack(codes, bits)
    assert unpack(packed, bits, len(codes)).tolist() == codes
    assert reference_unpack(packed.tolist(), bits, len(codes)) == codes


@pytest.mark.parametrize("bits", BITS)
def test_every_code_in_every_position(bits):
    """Each code at positions 0..15 of a 17-code stream: every bit offset mod 8, both bytes."""
    for code in range(2**bits):
        for pos in range(16):
            codes = background(17, bits)
            codes[pos] = code
            check(codes, bits)


@pytest.mark.parametrize("bits", BITS)
def test_all_codes_at_every_offset(bits):
    """The run 0..2^bits-1 after 0..7 leading codes: every code starts at every offset mod 8."""
    for lead in range(8):
        check(background(lead, bits) + list(range(2**bits)), bits)


@pytest.mark.parametrize("bits", BITS)
def test_every_length(bits):
    g = torch.Generator().manual_seed(bits)
    for n in range(18):
        check(torch.randint(0, 2**bits, (n,), generator=g).tolist(), bits)
        check([2**bits - 1] * n, bits)  # all ones: padding must stay zero


def test_four_bit_nibble_order():
    assert pack(torch.tensor([1, 2, 3], dtype=torch.uint8), 4).tolist() == [0x21, 0x03]


def test_errors():
    with pytest.raises(LowbitError):
        pack(torch.tensor([4]), 2)
    with pytest.raises(LowbitError):
        pack(torch.tensor([-1]), 3)
    for bits in (0, 9):
        with pytest.raises(LowbitError):
            pack(torch.tensor([0]), bits)
    with pytest.raises(LowbitError):
        unpack(torch.zeros(2, dtype=torch.uint8), 3, 7)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 13, 64])
def test_pack_and_unpack_stay_on_the_input_device(bits, n):
    """Every allocation follows the input (GPTQ hands over codes on the weight's device): on the
    ``meta`` device, which holds no data, a CPU allocation would surface as a device mismatch."""
    packed = pack(torch.zeros(n, dtype=torch.uint8, device="meta"), bits)
    assert packed.device.type == "meta" and packed.dtype == torch.uint8
    assert packed.shape == (packed_nbytes(n, bits),)
    codes = unpack(packed, bits, n)
    assert codes.device.type == "meta" and codes.dtype == torch.uint8 and codes.shape == (n,)
