"""Bit-packing of n-bit codes (1 to 8 bits) into bytes.

Layout: the codes form one little-endian bit stream: code ``i`` occupies stream bits
``[i*bits, (i+1)*bits)``, least significant bit first, and stream bit ``k`` is bit ``k % 8`` of
byte ``k // 8``. For 4 bits this puts code ``2j`` in the low nibble of byte ``j``. The last
byte is zero-padded. Pure functions; exhaustively tested.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lowbit.errors import LowbitError


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack(codes: Tensor, bits: int) -> Tensor:
    """(n,) integer codes in [0, 2**bits) -> (ceil(n*bits/8),) uint8."""
    _check_bits(bits)
    codes = codes.reshape(-1).to(torch.int64)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise LowbitError(f"codes must lie in [0, {2**bits}) to pack at {bits} bits")
    if bits == 8:
        return codes.to(torch.uint8)
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, no int64 bit stream needed
        k = 8 // bits
        c = torch.cat([codes, codes.new_zeros((-codes.numel()) % k)]).to(torch.uint8).reshape(-1, k)
        out = torch.zeros(c.shape[0], dtype=torch.uint8)
        for j in range(k):
            out |= c[:, j] << (j * bits)
        return out
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((codes[:, None] >> shifts) & 1).reshape(-1)  # (n*bits,) bits, LSB first
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)  # (nbytes, 8)
    return (stream << torch.arange(8, dtype=torch.int64)).sum(dim=1).to(torch.uint8)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """(nbytes,) uint8 -> (n,) uint8 codes; inverse of ``pack``."""
    _check_bits(bits)
    if packed.numel() != packed_nbytes(n, bits):
        raise LowbitError(f"{packed.numel()} packed bytes cannot hold {n} codes of {bits} bits")
    if bits == 8:
        return packed.reshape(-1).to(torch.uint8).clone()
    if 8 % bits == 0:
        k, mask = 8 // bits, 2**bits - 1
        parts = [(packed >> (j * bits)) & mask for j in range(k)]
        return torch.stack(parts, dim=1).reshape(-1)[:n].clone()
    stream = (packed.reshape(-1, 1).to(torch.int64) >> torch.arange(8, dtype=torch.int64)) & 1  # (nbytes, 8)
    stream = stream.reshape(-1)[: n * bits].reshape(n, bits)
    return (stream << torch.arange(bits, dtype=torch.int64)).sum(dim=1).to(torch.uint8)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise LowbitError(f"cannot pack {bits}-bit codes; bits must be 1 to 8")
