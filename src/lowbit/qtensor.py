"""``QuantizedTensor``: bit-packed codes plus scales and zeros, open extra roles, exact size accounting.

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

from lowbit.errors import LowbitError
from lowbit.formats.base import QParams
from lowbit.grouping import Region, from_blocks, grid_take, regions, to_blocks
from lowbit.packing import pack, unpack
from lowbit.scheme import ActSpec
from lowbit.spec import SCALE_DTYPES, QuantSpec, tile_of

LAYOUTS = ("rows", "experts", "transposed")
#: Every role a QuantizedTensor stores, in the order ``to_tensors`` writes them.
ROLES = ("codes", "scale", "zero", "global_scale", "mask", "lowrank_a", "lowrank_b", "input_scale")
#: The roles of folder format 1, which every export stores; the others are listed in a tensor's meta.
CORE_ROLES = ROLES[:4]


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
    """Round float32 scales to what ``storage`` holds; nonzero scales never round to zero, and a
    negative scale (``signed_scale`` formats) keeps its sign."""
    if storage in ("e8m0", "float8_e4m3fn"):
        return scale  # the format already chose representable scales
    dt = SCALE_DTYPES[storage]
    info = torch.finfo(dt)
    tiny = info.smallest_normal if dt == torch.bfloat16 else info.tiny * 2**-10 if dt == torch.float16 else info.tiny
    clamped = torch.where(scale != 0, scale.abs().clamp(min=tiny, max=info.max).copysign(scale), scale)
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
    """A quantized weight and what travels with it. Roles (``to_tensors`` keys):

    ============  ====================================  ==========================================
    role          in memory                             stored
    ============  ====================================  ==========================================
    codes         ``packed`` (ceil(rows*cols*bits/8),)  codes of the matrix view, row-major; with a
                  uint8                                 mask only the kept weights' codes (in
                                                        row-major order), metadata ``kept``: their count
    scale         (grid_rows, grid_cols) float32,       the spec's scale storage (fp16, bf16,
                  exactly representable when stored     e8m0 as uint8, e4m3)
    zero          same grid float32 or None             integer zero points packed at the format's
                                                        bit width, float offsets in scale dtype
    global_scale  () float32 or None                    (1,) float32
    mask          bool, the weight's ``shape``, or      1 bit per weight, packed; True keeps
                  None (a pruned weight)                the weight, dequantize zeroes the rest
    lowrank_a     (rows, r) float or int8, or None      as is (its own dtype); dequantize adds
    lowrank_b     (r, cols) float or int8, or None      ``A @ B`` to the matrix view
    input_scale   () float32 or None                    (1,) float32: the static scale of ``input``
    ============  ====================================  ==========================================

    lowrank_scale: (r,) float32 with int8 factors (and only with them): the term is
    ``A @ diag(lowrank_scale) @ B``; kept in the metadata (``lowrank.scale``), 32 bits each.
    input: the ``ActSpec`` of the layer's input activations (kept in the metadata), or None.
    shape: the original weight shape; ``layout`` says how it maps to the matrix view.
    """

    spec: QuantSpec
    shape: tuple[int, ...]
    layout: str
    packed: Tensor
    scale: Tensor
    zero: Tensor | None = None
    global_scale: Tensor | None = None
    mask: Tensor | None = None
    lowrank_a: Tensor | None = None
    lowrank_b: Tensor | None = None
    lowrank_scale: Tensor | None = None
    input: ActSpec | None = None
    input_scale: Tensor | None = None

    def __post_init__(self) -> None:
        rows, cols = self.matrix_shape
        if self.mask is not None and (self.mask.dtype != torch.bool or tuple(self.mask.shape) != tuple(self.shape)):
            raise LowbitError(f"a mask must be bool of the weight's shape {tuple(self.shape)}, "
                              f"not {self.mask.dtype} {tuple(self.mask.shape)}")
        a, b = self.lowrank_a, self.lowrank_b
        if (a is None) != (b is None):
            raise LowbitError("low-rank factors come in pairs: give both lowrank_a (rows, r) and lowrank_b (r, cols)")
        if a is not None and (a.dim() != 2 or b.dim() != 2 or a.shape[0] != rows or b.shape[1] != cols
                              or a.shape[1] != b.shape[0]):
            raise LowbitError(f"low-rank factors {tuple(a.shape)} @ {tuple(b.shape)} do not make the "
                              f"{rows}x{cols} matrix view; use (rows, r) and (r, cols)")
        integer = a is not None and not a.is_floating_point()
        if integer != (self.lowrank_scale is not None) or (integer and (
                a.dtype != torch.int8 or b.dtype != torch.int8 or tuple(self.lowrank_scale.shape) != (a.shape[1],))):
            raise LowbitError("int8 low-rank factors need a lowrank_scale of shape (r,), and only they take one; "
                              f"got factors {None if a is None else a.dtype} and scale "
                              f"{None if self.lowrank_scale is None else tuple(self.lowrank_scale.shape)}")
        static = self.input is not None and not self.input.dynamic
        if static != (self.input_scale is not None):
            raise LowbitError("an input_scale goes with a static input spec (and only with it)")

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return matrix_shape(self.shape, self.layout)

    @property
    def tile(self) -> tuple[int, int]:
        return tile_of(self.spec.granularity, *self.matrix_shape)

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def rank(self) -> int:
        """Rank of the low-rank factors (0 without them)."""
        return 0 if self.lowrank_a is None else self.lowrank_a.shape[1]

    def codes(self) -> Tensor:
        """(rows, cols) uint8 codes of the matrix view."""
        rows, cols = self.matrix_shape
        return unpack(self.packed, self.spec.format.bits, rows * cols).reshape(rows, cols)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Reconstruction in the original shape: codes times scales, masked, plus ``A @ B``."""
        out = self.dequantize_codes()
        if self.mask is not None:
            out = out.masked_fill_(~matrix_view(self.mask, self.layout).to(out.device), 0)
        if self.lowrank_a is not None:
            out += self.lowrank_term().to(out.device)
        return from_matrix(out, self.shape, self.layout).to(dtype)

    def lowrank_term(self) -> Tensor:
        """(rows, cols) float32 ``A @ B`` (``A @ diag(lowrank_scale) @ B`` for int8 factors)."""
        a = self.lowrank_a.to(torch.float32)
        if self.lowrank_scale is not None:
            a = a * self.lowrank_scale.to(a.device, torch.float32)
        return a @ self.lowrank_b.to(torch.float32).to(a.device)

    def dequantize_codes(self) -> Tensor:
        """(rows, cols) float32: codes times scales only (no mask, no low-rank term)."""
        fmt, codes = self.spec.format, self.codes()
        out = torch.empty(self.matrix_shape, dtype=torch.float32, device=codes.device)
        for region in regions(self.matrix_shape, self.tile):
            qp = self.qparams(region)
            from_blocks(fmt.dequantize(to_blocks(codes, region), qp), region, out)
        return out

    def qparams(self, region: Region) -> QParams:
        zero = None if self.zero is None else grid_take(self.zero, region)
        return QParams(grid_take(self.scale, region), zero, self.global_scale)

    # --- accounting ----------------------------------------------------------------------
    def nbits(self) -> int:
        """Exact storage in bits of every stored role (and of the int8 factors' scales in the metadata)."""
        meta_bits = 0 if self.lowrank_scale is None else 32 * self.lowrank_scale.numel()
        return sum(_bits(t) for t in self._stored().values()) - self._pad_bits() + meta_bits

    def _pad_bits(self) -> int:
        """Bits of byte padding in packed codes, zeros and mask (not information)."""
        stored = self.numel if self.mask is None else int(self.mask.sum())
        fmt, pad = self.spec.format, -(stored * self.spec.format.bits) % 8
        if self.mask is not None:
            pad += -self.numel % 8
        if self.zero is not None and fmt.zero_kind == "int":
            pad += -(self.zero.numel() * fmt.bits) % 8
        return pad

    def bits_per_weight(self) -> float:
        return self.nbits() / self.numel

    # --- serialization -------------------------------------------------------------------
    def to_tensors(self) -> dict[str, Tensor]:
        """Tensors to store, keyed by role (see the class table); absent roles are left out."""
        return self._stored()

    def _stored(self) -> dict[str, Tensor]:
        storage, fmt = scale_storage(self.spec), self.spec.format
        codes = self.packed
        if self.mask is not None:  # a sparse tensor stores the kept weights' codes only
            keep = matrix_view(self.mask, self.layout).reshape(-1).to(self.packed.device)
            codes = pack(self.codes().reshape(-1)[keep].to(torch.int64), fmt.bits)
        out = {"codes": codes, "scale": encode_scale(self.scale, storage)}
        if self.zero is not None:
            if fmt.zero_kind == "int":  # integer zero points are packed at the format's bit width
                out["zero"] = pack(self.zero.reshape(-1).to(torch.int64), fmt.bits)
            else:
                out["zero"] = self.zero.to(SCALE_DTYPES[self.spec.scale_dtype])
        if self.global_scale is not None:
            out["global_scale"] = self.global_scale.reshape(1).to(torch.float32)
        if self.mask is not None:
            out["mask"] = pack_mask(self.mask)
        if self.lowrank_a is not None:
            out["lowrank_a"], out["lowrank_b"] = self.lowrank_a, self.lowrank_b
        if self.input_scale is not None:
            out["input_scale"] = self.input_scale.reshape(1).to(torch.float32)
        return out

    def meta(self) -> dict:
        """JSON metadata: spec, shape, layout, and (only when present) input spec and extra roles."""
        out = {"spec": self.spec.to_dict(), "shape": list(self.shape), "layout": self.layout}
        extra = sorted(r for r in self._stored() if r not in CORE_ROLES)
        if extra:
            out["roles"] = extra
        if self.lowrank_a is not None:
            out["lowrank"] = {"rank": self.rank, "dtype": str(self.lowrank_a.dtype).removeprefix("torch.")}
            if self.lowrank_scale is not None:  # float32 values, exact as JSON doubles
                out["lowrank"]["scale"] = [float(v) for v in self.lowrank_scale.to(torch.float32).cpu()]
        if self.input is not None:
            out["input"] = self.input.to_dict()
        if self.mask is not None:
            out["kept"] = int(self.mask.sum())  # the stored codes are the kept weights' only
        return out

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, Tensor], spec: QuantSpec | None = None,
                     name: str = "this tensor") -> "QuantizedTensor":
        """Inverse of ``to_tensors``; pass ``spec`` when it is already parsed from ``meta``.

        ``name`` (the weight's key) goes into the error for an unknown or missing role.
        """
        unknown = sorted(set(tensors) - set(ROLES))
        if unknown:
            raise LowbitError(f"{name} has a stored role {unknown[0]!r} this lowbit does not know (it knows "
                              f"{', '.join(ROLES)}); the folder needs a newer lowbit")
        missing = [r for r in ("codes", "scale", *meta.get("roles", ())) if r not in tensors]
        if missing:
            raise LowbitError(f"{name} lacks its stored {missing[0]!r} tensor; the folder is damaged, quantize again")
        spec = spec if spec is not None else QuantSpec.from_dict(meta["spec"])
        shape = tuple(meta["shape"])
        scale = decode_scale(tensors["scale"], scale_storage(spec))
        zero = tensors.get("zero")
        if zero is not None and spec.format.zero_kind == "int":
            zero = unpack(zero, spec.format.bits, scale.numel()).reshape(scale.shape)
        gs, mask, iscale = tensors.get("global_scale"), tensors.get("mask"), tensors.get("input_scale")
        mask = None if mask is None else unpack_mask(mask, shape)
        packed = tensors["codes"]
        if "kept" in meta:
            if mask is None:
                raise LowbitError(f"{name} stores the codes of kept weights only but has no mask; the folder is damaged")
            packed = _scatter_kept(packed, matrix_view(mask, meta["layout"]), spec.format)
        return cls(
            spec=spec, shape=shape, layout=meta["layout"], packed=packed, scale=scale,
            zero=None if zero is None else zero.to(torch.float32),
            global_scale=None if gs is None else gs.reshape(()).to(torch.float32),
            mask=mask,
            lowrank_a=tensors.get("lowrank_a"), lowrank_b=tensors.get("lowrank_b"),
            lowrank_scale=_lowrank_scale(meta),
            input=None if meta.get("input") is None else ActSpec.from_dict(meta["input"]),
            input_scale=None if iscale is None else iscale.reshape(()).to(torch.float32),
        )


def _lowrank_scale(meta: dict) -> Tensor | None:
    scale = meta.get("lowrank", {}).get("scale")
    return None if scale is None else torch.tensor(scale, dtype=torch.float32)


def _scatter_kept(packed: Tensor, keep: Tensor, fmt) -> Tensor:
    """Packed codes of the kept weights (row-major) -> packed codes of the whole (rows, cols)
    matrix view. Pruned weights get a symmetric integer format's zero code (2^(bits-1), so the
    packed int8/int4 kernels, which do not read the mask, compute with exact zeros), and code 0
    in other formats (the mask zeroes them on dequantization, the only path those formats take)."""
    bits = fmt.bits
    fill = 2 ** (bits - 1) if fmt.family == "int" and fmt.symmetric else 0
    keep = keep.reshape(-1)
    if packed.device.type == "meta":  # shapes only (lazy loading): the dense size, no values
        return torch.empty(-(-keep.numel() * bits // 8), dtype=torch.uint8, device="meta")
    keep = keep.to(packed.device)
    kept = int(keep.sum())
    if packed.numel() != -(-kept * bits // 8):
        raise LowbitError(f"{packed.numel()} bytes of codes do not hold the {kept} kept weights' {bits}-bit codes; "
                          "the folder is damaged")
    dense = torch.full((keep.numel(),), fill, dtype=torch.int64, device=packed.device)
    dense[keep] = unpack(packed, bits, kept).to(torch.int64)
    return pack(dense, bits)


def _bits(t: Tensor) -> int:
    return t.numel() * t.element_size() * 8


def pack_mask(mask: Tensor) -> Tensor:
    """bool mask of any shape -> (ceil(numel/8),) uint8, one bit per weight, row-major."""
    return pack(mask.reshape(-1).to(torch.uint8), 1)


def unpack_mask(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of ``pack_mask``: (ceil(numel/8),) uint8 -> bool of ``shape``."""
    return unpack(packed, 1, prod(shape)).reshape(shape).bool()
