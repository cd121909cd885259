"""The ``Format`` contract, and the helpers its families share.

A format turns blocks of real numbers into integer codes and back. It only ever sees a 2-D
view ``blocks: (n_blocks, block_size)`` (float32); the reshaping for a granularity happens once,
in :mod:`lowbit.grouping`. Every format exposes its element value table (``values()``), so
exporters, the ``lowbit formats`` command and the conformance tests can all read the grid.
The formats by name (``get_format``, ``format_from_dict``) are in :mod:`lowbit.formats.registry`.

Reconstruction contract, per block ``i`` and element ``j``::

    x̂[i, j] = scale[i] * values[code[i, j]]                  (symmetric / scale-only formats)
    x̂[i, j] = scale[i] * (code[i, j] - zero[i])              (integer zero point)
    x̂[i, j] = scale[i] * code[i, j] + zero[i]                (float zero = block minimum, Q4_1/HQQ)

and block-scaled formats with a tensor-wide scale multiply by ``global_scale`` as well.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lowbit.formats.nearest import NearestTable, gather

#: float32 scales -> the float32 values their storage dtype holds (``Format.choose_qparams``)
ScaleRounding = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class QParams:
    """Quantization parameters for a stack of blocks.

    scale:        (n_blocks, 1) float32, already rounded to its storage dtype.
    zero:         (n_blocks, 1) float32 or None. Integer-valued zero point in code units, or a
                  float offset in weight units when the format uses a float zero.
    global_scale: () float32 or None; one tensor-wide factor (NVFP4's second level).
    """

    scale: Tensor
    zero: Tensor | None = None
    global_scale: Tensor | None = None


class Format:
    """Base class of every number format; subclasses are frozen dataclasses.

    Subclasses set ``family`` (the key of ``formats.registry.FAMILIES``), ``bits`` and ``symmetric`` and implement
    ``values``, ``choose_qparams``, ``quantize`` and ``dequantize``. ``symmetric`` means a scale
    and no zero point, on a grid centred on 0; ``odd`` promises more, that quantization is odd:
    ``Q(-x) == -Q(x)`` (a full-range integer grid is symmetric but not odd: its most negative
    code has no positive twin). Quantization is elementwise given the qparams
    (GPTQ quantizes one column at a time). Table formats round with ``nearest`` and
    reconstruct with ``lookup``, whose tables are built once per format and device.
    """

    family: ClassVar[str] = ""
    fixed_block: ClassVar[int | None] = None  # block size dictated by the format (MX: 32)
    scale_storage: ClassVar[str | None] = None  # storage dtype of scales dictated by the format
    signed_scale: ClassVar[bool] = False  # whether a block scale may be negative (int's ``intB_ss``)
    bits: int
    symmetric: bool

    # --- the contract ------------------------------------------------------------------
    @property
    def name(self) -> str:
        raise NotImplementedError

    def values(self) -> Tensor:
        """Element value of every code, shape (2**bits,) float64; NaN marks unused codes."""
        raise NotImplementedError

    def choose_qparams(self, blocks: Tensor, clip: float = 1.0, global_scale: Tensor | None = None,
                       round_scale: ScaleRounding | None = None) -> QParams:
        """Pick scale (and zero) per block. ``clip`` in (0, 1] shrinks the covered range.

        ``round_scale`` maps (n_blocks, 1) float32 scales to the float32 values their storage
        dtype holds (None: kept as computed). The returned scale is ``round_scale(scale)``, and a
        zero point is fitted to that rounded scale, so that the stored pair is consistent.
        """
        raise NotImplementedError

    def quantize(self, blocks: Tensor, qp: QParams) -> Tensor:
        """Codes for ``blocks`` (n_blocks, block_size) float32 -> same shape, uint8."""
        raise NotImplementedError

    def dequantize(self, codes: Tensor, qp: QParams) -> Tensor:
        """Codes (n_blocks, block_size) uint8 -> float32 reconstruction."""
        raise NotImplementedError

    def fake_quantize(self, blocks: Tensor, qp: QParams) -> Tensor:
        """``dequantize(quantize(blocks, qp), qp)``: the reconstruction (n_blocks, block_size) float32,
        value for value (a family may fuse the two without the uint8 codes; a zero may differ in sign)."""
        return self.dequantize(self.quantize(blocks, qp), qp)

    def global_scale(self, x: Tensor) -> Tensor | None:
        """A tensor-wide scale computed from the whole tensor, or None (the default)."""
        return None

    # --- derived -----------------------------------------------------------------------
    @property
    def max(self) -> float:
        """Largest finite magnitude of the element grid."""
        return _max(self)

    def nearest(self, x: Tensor) -> Tensor:
        """uint8 code of the nearest finite entry of ``values()`` for every element of ``x``.

        The rules of :func:`nearest_code`. The table is prepared once per format and device
        (formats are frozen, hence hashable), so a call is a binary search or, for large
        float32 inputs, a bucket look-up (:class:`~lowbit.formats.nearest.NearestTable`).
        """
        return _nearest_table(self, x.device)(x, torch.uint8)

    def lookup(self, codes: Tensor) -> Tensor:
        """float32 ``values()[codes]`` (NaN for unused codes), from the cached table."""
        return gather(_values32(self, codes.device), codes)

    @property
    def odd(self) -> bool:
        """Whether quantization is odd, ``Q(-x) == -Q(x)`` (default: ``symmetric``)."""
        return self.symmetric

    @classmethod
    def upgrade_dict(cls, d: dict[str, Any]) -> dict[str, Any]:
        """Fill the fields an older lowbit did not write with the values of their old meaning.

        ``d`` is a ``to_dict`` output without its ``family``; the default adds nothing.
        """
        return d

    @property
    def zero_kind(self) -> str | None:
        """'int', 'float' or None: how a zero point is stored, if the format has one."""
        return None

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"family": self.family, **asdict(self)}  # type: ignore[call-overload]


# --- helpers shared by the families ----------------------------------------------------
def safe_scale(scale: Tensor) -> Tensor:
    """Replace zero scales by one so that division is defined (all-zero blocks stay zero); a
    negative scale (``signed_scale`` formats) is kept."""
    return torch.where(scale != 0, scale, torch.ones_like(scale))


def rounded(scale: Tensor, round_scale: ScaleRounding | None) -> Tensor:
    """``round_scale(scale)``, or ``scale`` itself when no rounding is given."""
    return scale if round_scale is None else round_scale(scale)


def absmax(blocks: Tensor) -> Tensor:
    """(n_blocks, block_size) -> (n_blocks, 1) largest magnitude."""
    return blocks.abs().amax(dim=1, keepdim=True)


@functools.lru_cache(maxsize=64)
def _table_of_bits(bits: tuple[int, ...], device: torch.device) -> NearestTable:
    return NearestTable.build(torch.tensor(bits, dtype=torch.int64).view(torch.float64), device)


def nearest_code(x: Tensor, values: Tensor) -> Tensor:
    """Index of the nearest finite entry of ``values`` for every element of ``x``.

    x: any shape, float32. values: (K,) float64 with NaN for unused codes.
    Ties go to the even code (for minifloats: the even mantissa, IEEE round-half-even).
    Values beyond the grid saturate to its ends. Returns int64 codes of ``x``'s shape.
    The prepared table (:class:`~lowbit.formats.nearest.NearestTable`) is cached by the bits of
    ``values``; formats use :meth:`Format.nearest`, which caches it per format.
    """
    bits = tuple(values.detach().to("cpu", torch.float64).contiguous().view(torch.int64).tolist())
    return _table_of_bits(bits, x.device)(x)


# --- per-format caches (formats are frozen dataclasses, hence hashable) ------------------
@functools.lru_cache(maxsize=512)
def _max(fmt: Format) -> float:
    v = fmt.values()
    return float(v[torch.isfinite(v)].abs().max())


@functools.lru_cache(maxsize=512)
def _values32(fmt: Format, device: torch.device) -> Tensor:
    """(2**bits,) float32 ``values()`` on ``device``."""
    with torch.inference_mode(False):  # a cached tensor must be an ordinary one, wherever built
        return fmt.values().to(device, torch.float32)


@functools.lru_cache(maxsize=512)
def _nearest_table(fmt: Format, device: torch.device) -> NearestTable:
    return NearestTable.build(fmt.values(), device)
