"""AdaRound's pure parts (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
Quantization", arXiv:2004.10568): the rectified sigmoid, V's start, the rounding regularizer with
its β schedule, and the soft and hard reconstructions, over any format's grid.

Per weight ``w`` with its two neighbouring grid values ``lo <= w <= hi``::

    h(V)   = clip(σ(V)·(ζ − γ) + γ, 0, 1)        ζ = 1.1, γ = −0.1      (rectified sigmoid)
    soft   = lo + h(V)·(hi − lo)                                        (training forward)
    hard   = hi if V >= 0 else lo                                       (h rounded at 1/2)
    reg(β) = Σ (1 − |2h − 1|^β)                  0 at h ∈ {0, 1}, 1 at h = 1/2
    V₀     : h(V₀) = frac = (w − lo) / (hi − lo)  (the soft forward starts at w itself)

On a uniform integer grid ``lo = s·(floor(w/s) − z)`` and ``hi = lo + s``, which is the paper's
``s·clip(floor(W/s) + h(V), n, p)``: inside the range exactly, and outside it both neighbours are
the grid's end (``lo == hi``), where the paper's clip makes ``h`` irrelevant too.

Generalisation (ours): for non-uniform grids (NF4, fp4 minifloats, NUPES power grids, MX, NVFP4)
"down" and "up" are the two neighbouring reconstruction values of ``w`` on the block's own grid
(the format's ``dequantize`` of every finite code with the block's qparams), and ``h``
interpolates linearly between them. The pair is built around the format's own rounding
(``quantize``), so an element keeps the code round-to-nearest gives it whenever the pair
collapses (``lo == hi``: beyond the grid's ends, all-zero blocks).

Choices of ours, where the paper leaves a detail open:

* the hard decision is read from ``V``'s sign (``h(V) >= 1/2`` exactly when ``V >= 0``), so it
  is exact in floating point;
* where ``frac`` lies within about 3e-4 of 1/2 the start ``V₀`` takes the side of the format's
  own rounding (ties to even, float division), so that with no training the hard rounding of
  an integer grid is round-to-nearest bit for bit; the soft start there is off by at most
  6e-4 of a step;
* the β schedule is BRECQ's (Li et al., arXiv:2102.05426): no regularizer for the first 20% of
  the steps, then β falls linearly from 20 to 2 (MetaAug uses the same, shared/papers §11).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.formats.base import Format, QParams
from lowbit.grouping import from_blocks, grid_take, regions, to_blocks
from lowbit.spec import QuantSpec, tile_of

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (the paper's ζ and γ)
TIE_V = 1e-3  # |V₀| below this (|frac − 1/2| < 3e-4): V₀ takes the format's own rounding side


def rectified_sigmoid(V: Tensor) -> Tensor:
    """h(V) = clip(σ(V)·(ζ − γ) + γ, 0, 1), elementwise; any shape, float."""
    return (torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def initial_v(frac: Tensor, up: Tensor) -> Tensor:
    """V₀ with h(V₀) = ``frac`` (float32 in [0, 1], any shape), the inverse of the rectified sigmoid.

    ``up`` (bool, same shape) is the side the format's own rounding chose; near a tie
    (``|V₀| < TIE_V``) V₀ takes that side (``+0`` for up, ``−TIE_V`` for down).
    """
    p = ((frac.clamp(0.0, 1.0) - GAMMA) / (ZETA - GAMMA)).to(torch.float32)  # in [1/12, 11/12]
    V = torch.log(p) - torch.log1p(-p)  # logit
    near_tie = V.abs() < TIE_V
    side = torch.where(up, torch.zeros_like(V), torch.full_like(V, -TIE_V))
    return torch.where(near_tie & ((V >= 0) != up), side, V)


def regularizer(h: Tensor, beta: float) -> Tensor:
    """Σ(1 − |2h − 1|^β) over every element of ``h``: a () float32 tensor."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def beta_at(step: int, steps: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float | None:
    """β at ``step`` (0-based) of ``steps``; None during the warm-up (no regularizer then)."""
    first = int(warmup * steps)
    if step < first:
        return None
    progress = (step - first) / max(steps - first, 1)
    return end + (start - end) * max(0.0, 1.0 - progress)


def soft(lo: Tensor, hi: Tensor, V: Tensor) -> Tensor:
    """lo + h(V)·(hi − lo): the differentiable reconstruction, shapes of ``V``."""
    return lo + rectified_sigmoid(V) * (hi - lo)


@dataclass(frozen=True)
class GridPair:
    """Each weight's two neighbouring grid values and their codes, (rows, cols) each.

    lo, hi: float32 reconstructions (lo <= hi); down, up: their uint8 codes; near: the format's
    own code (round to nearest); frac: float32 (w − lo) / (hi − lo) in [0, 1] (0 where lo == hi).
    """

    lo: Tensor
    hi: Tensor
    down: Tensor
    up: Tensor
    near: Tensor
    frac: Tensor

    def start(self) -> Tensor:
        """V₀ (rows, cols) float32: h(V₀) = frac, rounding like the format near ties."""
        return initial_v(self.frac, (self.near == self.up) & (self.hi > self.lo))

    def hard(self, V: Tensor) -> Tensor:
        """The reconstruction of the hard rounding of ``V``: hi where V >= 0, else lo."""
        return torch.where(V >= 0, self.hi, self.lo)

    def codes(self, V: Tensor) -> Tensor:
        """uint8 codes of the hard rounding; the format's own code where lo == hi."""
        chosen = torch.where(V >= 0, self.up, self.down)
        return torch.where(self.hi > self.lo, chosen, self.near)


@functools.lru_cache(maxsize=64)
def _ranks(fmt: Format) -> tuple[Tensor, Tensor]:
    """(rank of each code among the distinct finite values, −1 for unused codes; a code per rank)."""
    v = fmt.values()
    finite = torch.isfinite(v)
    distinct = torch.unique(v[finite])  # sorted
    rank = torch.full(v.shape, -1, dtype=torch.int64)
    rank[finite] = torch.searchsorted(distinct, v[finite])
    code = torch.zeros(len(distinct), dtype=torch.int64)
    for c in reversed(range(len(v))):  # the lowest code of each value
        if rank[c] >= 0:
            code[rank[c]] = c
    return rank, code


def pair_blocks(blocks: Tensor, fmt: Format, qp: QParams) -> tuple[Tensor, ...]:
    """(lo, hi, down, up, near) for ``blocks`` (n_blocks, block_size) float32 on the grid of ``qp``.

    Both neighbours come from the ranks of the distinct grid values around the format's own
    code; a neighbour of the same rank as that code is that code itself.
    """
    rank, code = (t.to(blocks.device) for t in _ranks(fmt))
    near = fmt.quantize(blocks, qp)  # (n_blocks, block_size) uint8
    r = rank[near.long()]
    above = blocks >= fmt.dequantize(near, qp)
    dr = torch.where(above, r, r - 1).clamp(min=0)
    ur = torch.where(above, r + 1, r).clamp(max=len(code) - 1)
    down = torch.where(dr == r, near, code[dr].to(torch.uint8))
    up = torch.where(ur == r, near, code[ur].to(torch.uint8))
    lo, hi = fmt.dequantize(down, qp), fmt.dequantize(up, qp)
    return lo, hi, down, up, near  # lo <= hi: reconstructions grow with the value (scale >= 0)


def grid_pair(m: Tensor, spec: QuantSpec, scale: Tensor, zero: Tensor | None, global_scale: Tensor | None) -> GridPair:
    """The ``GridPair`` of a (rows, cols) float32 matrix under fixed qparams: ``scale`` (and
    ``zero``) grids (grid_rows, grid_cols) float32 as stored, ``global_scale`` () or None."""
    rows, cols = m.shape
    tile = tile_of(spec.granularity, rows, cols)
    m = m.detach().to(torch.float32)
    out = [torch.empty((rows, cols), dtype=t, device=m.device) for t in (torch.float32,) * 2 + (torch.uint8,) * 3]
    for region in regions((rows, cols), tile):
        z = None if zero is None else grid_take(zero, region)
        qp = QParams(grid_take(scale, region), z, global_scale)
        for part, o in zip(pair_blocks(to_blocks(m, region), spec.format, qp), out):
            from_blocks(part, region, o)
    lo, hi, down, up, near = out
    width = hi - lo
    frac = torch.where(width > 0, (m - lo) / torch.where(width > 0, width, torch.ones_like(width)), 0.0)
    return GridPair(lo, hi, down, up, near, frac.clamp(0.0, 1.0))
