"""``QuantizedTensor``: bit-packed codes plus scales and zeros, and exact size accounting.

A weight of any shape is quantized through a 2-D *matrix view* ``(rows, cols)``; groups always
run along ``cols`` (the input dimension):

=============  =========================  ==========================================
layout         weight                     matrix view
=============  =========================  ==========================================
``rows``       Linear (out, in), conv     ``w.reshape(shape[0], -1)``
``experts``    fused experts (E, out, in) ``w.reshape(-1, shape[-1])``
``transposed`` GPT-2 Conv1D (in, out)     ``w.T``
=============  =========================  ==========================================
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch
from torch import Tensor

from lowbit import grouping
from lowbit.errors import LowbitError
from lowbit.formats.base import QParams
from lowbit.packing import pack, unpack
from lowbit.spec import SCALE_DTYPES, QuantSpec, tile_of

LAYOUTS = ("rows", "experts", "transposed")


def matrix_view(w: Tensor, layout: str) -> Tensor:
    """Weight -> (rows, cols) matrix view (see the module table)."""
    if layout == "rows":
        return w.reshape(w.shape[0], -1)
    if layout == "experts":
        return w.reshape(-1, w.shape[-1])
    if layout == "transposed":
        return w.t()
    raise LowbitError(f"unknown layout {layout!r}; use one of {LAYOUTS}")


def matrix_shape(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    if layout == "rows":
        return shape[0], prod(shape[1:])
    if layout == "experts":
        return prod(shape[:-1]), shape[-1]
    return shape[1], shape[0]


def from_matrix(m: Tensor, shape: tuple[int, ...], layout: str) -> Tensor:
    return m.t().contiguous() if layout == "transposed" else m.reshape(shape)


# --- scale storage -----------------------------------------------------------------------
def scale_storage(spec: QuantSpec) -> str:
    return spec.format.scale_storage or spec.scale_dtype


def storage_bits(storage: str) -> int:
    return {"float32": 32, "float16": 16, "bfloat16": 16, "e8m0": 8, "float8_e4m3fn": 8}[storage]


def round_scale(scale: Tensor, storage: str) -> Tensor:
    """Round float32 scales to what ``storage`` holds; nonzero scales never round to zero."""
    if storage in ("e8m0", "float8_e4m3fn"):
        return scale  # the format already chose representable scales
    dt = SCALE_DTYPES[storage]
    info = torch.finfo(dt)
    tiny = info.smallest_normal if dt == torch.bfloat16 else info.tiny * 2**-10 if dt == torch.float16 else info.tiny
    clamped = torch.where(scale > 0, scale.clamp(min=tiny, max=info.max), scale)
    return clamped.to(dt).to(torch.float32)


def encode_scale(scale: Tensor, storage: str) -> Tensor:
    """float32 scale grid -> the stored tensor (e8m0 as a uint8 biased exponent)."""
    if storage == "e8m0":
        return (torch.log2(scale).round() + 127).clamp(0, 254).to(torch.uint8)
    if storage == "float8_e4m3fn":
        return scale.to(torch.float8_e4m3fn)
    return scale.to(SCALE_DTYPES[storage])


def decode_scale(stored: Tensor, storage: str) -> Tensor:
    if storage == "e8m0":
        return torch.exp2(stored.to(torch.float32) - 127)
    return stored.to(torch.float32)


@dataclass
class QuantizedTensor:
    """A quantized weight.

    packed:       (ceil(rows*cols*bits/8),) uint8, codes of the matrix view in row-major order.
    scale:        (grid_rows, grid_cols) float32 scale grid (values exactly representable in
                  the spec's scale storage).
    zero:         same shape float32 or None; integer zero points (stored packed at the
                  format's bit width) or float offsets (stored in the scale dtype).
    global_scale: () float32 or None.
    shape:        the original weight shape; ``layout`` says how it maps to the matrix view.
    """

    spec: QuantSpec
    shape: tuple[int, ...]
    layout: str
    packed: Tensor
    scale: Tensor
    zero: Tensor | None = None
    global_scale: Tensor | None = None

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return matrix_shape(self.shape, self.layout)

    @property
    def tile(self) -> tuple[int, int]:
        return tile_of(self.spec.granularity, *self.matrix_shape)

    @property
    def numel(self) -> int:
        return prod(self.shape)

    def codes(self) -> Tensor:
        """(rows, cols) uint8 codes of the matrix view."""
        rows, cols = self.matrix_shape
        return unpack(self.packed, self.spec.format.bits, rows * cols).reshape(rows, cols)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Reconstruction in the original shape."""
        fmt, codes = self.spec.format, self.codes()
        out = torch.empty(self.matrix_shape, dtype=torch.float32, device=codes.device)
        for region in grouping.regions(self.matrix_shape, self.tile):
            qp = self.qparams(region)
            grouping.from_blocks(fmt.dequantize(grouping.to_blocks(codes, region), qp), region, out)
        return from_matrix(out, self.shape, self.layout).to(dtype)

    def qparams(self, region: grouping.Region) -> QParams:
        zero = None if self.zero is None else grouping.grid_take(self.zero, region)
        return QParams(grouping.grid_take(self.scale, region), zero, self.global_scale)

    # --- accounting ----------------------------------------------------------------------
    def nbits(self) -> int:
        """Exact storage in bits: codes, scales, zeros and the global scale."""
        fmt = self.spec.format
        n = self.numel * fmt.bits + self.scale.numel() * storage_bits(scale_storage(self.spec))
        if self.zero is not None:
            zbits = fmt.bits if fmt.zero_kind == "int" else storage_bits(self.spec.scale_dtype)
            n += self.zero.numel() * zbits
        if self.global_scale is not None:
            n += 32
        return n

    def bits_per_weight(self) -> float:
        return self.nbits() / self.numel

    # --- serialization -------------------------------------------------------------------
    def to_tensors(self) -> dict[str, Tensor]:
        """Tensors to store, keyed by role: codes, scale, zero, global_scale."""
        storage = scale_storage(self.spec)
        out = {"codes": self.packed, "scale": encode_scale(self.scale, storage)}
        if self.zero is not None:
            fmt = self.spec.format
            if fmt.zero_kind == "int":  # integer zero points are packed at the format's bit width
                out["zero"] = pack(self.zero.reshape(-1).to(torch.int64), fmt.bits)
            else:
                out["zero"] = self.zero.to(SCALE_DTYPES[self.spec.scale_dtype])
        if self.global_scale is not None:
            out["global_scale"] = self.global_scale.reshape(1).to(torch.float32)
        return out

    def meta(self) -> dict:
        return {"spec": self.spec.to_dict(), "shape": list(self.shape), "layout": self.layout}

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, Tensor], spec: QuantSpec | None = None) -> "QuantizedTensor":
        """Inverse of ``to_tensors``; pass ``spec`` when it is already parsed from ``meta``."""
        spec = spec if spec is not None else QuantSpec.from_dict(meta["spec"])
        scale = decode_scale(tensors["scale"], scale_storage(spec))
        zero = tensors.get("zero")
        if zero is not None and spec.format.zero_kind == "int":
            zero = unpack(zero, spec.format.bits, scale.numel()).reshape(scale.shape)
        gs = tensors.get("global_scale")
        return cls(
            spec=spec,
            shape=tuple(meta["shape"]),
            layout=meta["layout"],
            packed=tensors["codes"],
            scale=scale,
            zero=None if zero is None else zero.to(torch.float32),
            global_scale=None if gs is None else gs.reshape(()).to(torch.float32),
        )
