"""Bit-packing of n-bit codes (1 to 8 bits) into bytes.

Layout: the codes form one little-endian bit stream: code ``i`` occupies stream bits
``[i*bits, (i+1)*bits)``, least significant bit first, and stream bit ``k`` is bit ``k % 8`` of
byte ``k // 8``. For 4 bits this puts code ``2j`` in the low nibble of byte ``j``. The last
byte is zero-padded. Pure functions; exhaustively tested. Every tensor they allocate lives on
the device of their input, so codes from a CUDA GPTQ run pack on the GPU (tested on ``meta``).

Widths that divide 8 put whole codes in a byte. The others (3, 5, 6, 7) work on groups of 8
codes, which fill exactly ``bits`` bytes: one int64 per group holds the group's ``8·bits`` stream
bits, so the temporaries take about 2 bytes per code (an int64 bit per stream bit would take
``8·bits``; measured, 1.6 GB for one 3-bit 49152×576 matrix).
"""
from __future__ import annotations

import torch
from torch import Tensor

from lowbit.errors import LowbitError


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack(codes: Tensor, bits: int) -> Tensor:
    """(n,) integer codes in [0, 2**bits) -> (ceil(n*bits/8),) uint8 on the codes' device.

    The range check reads the codes, so it is skipped on the ``meta`` device (no values).
    """
    _check_bits(bits)
    codes = codes.reshape(-1)
    if codes.numel() and not codes.is_meta and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise LowbitError(f"codes must lie in [0, {2**bits}) to pack at {bits} bits")
    codes = codes.to(torch.uint8)
    n = codes.numel()
    if bits == 8:
        return codes.clone()
    whole = 8 % bits == 0  # 1, 2, 4 bits: whole codes in a byte
    k = 8 // bits if whole else 8  # codes per byte, or per group of `bits` bytes
    c = torch.cat([codes, codes.new_zeros(-n % k)]).reshape(-1, k)  # (bytes or groups, k) uint8
    if whole:
        out = c.new_zeros(c.shape[0])  # (bytes,) uint8
        for j in range(k):
            out |= c[:, j] << (j * bits)
        return out
    v = c.new_zeros(c.shape[0], dtype=torch.int64)  # (groups,) the group's 8·bits stream bits
    for j in range(8):
        v |= c[:, j].to(torch.int64) << (j * bits)
    out = c.new_empty((c.shape[0], bits))  # (groups, bits) uint8 bytes, low byte first
    for b in range(bits):
        out[:, b] = (v >> (8 * b)) & 0xFF
    return out.reshape(-1)[:packed_nbytes(n, bits)].clone()


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """(nbytes,) uint8 -> (n,) uint8 codes on the same device; inverse of ``pack``."""
    _check_bits(bits)
    if packed.numel() != packed_nbytes(n, bits):
        raise LowbitError(f"{packed.numel()} packed bytes cannot hold {n} codes of {bits} bits")
    if bits == 8:
        return packed.reshape(-1).to(torch.uint8).clone()
    if 8 % bits == 0:
        k, mask = 8 // bits, 2**bits - 1
        parts = [(packed >> (j * bits)) & mask for j in range(k)]
        return torch.stack(parts, dim=1).reshape(-1)[:n].clone()
    packed = packed.reshape(-1)
    groups = -(-n // 8)
    b = torch.cat([packed, packed.new_zeros(groups * bits - packed.numel())]).reshape(groups, bits)
    v = b.new_zeros(groups, dtype=torch.int64)  # (groups,) 8 codes' stream bits each
    for i in range(bits):
        v |= b[:, i].to(torch.int64) << (8 * i)
    out = b.new_empty((groups, 8), dtype=torch.uint8)  # (groups, 8) codes
    mask = 2**bits - 1
    for j in range(8):
        out[:, j] = (v >> (j * bits)) & mask
    return out.reshape(-1)[:n].clone()


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise LowbitError(f"cannot pack {bits}-bit codes; bits must be 1 to 8")
