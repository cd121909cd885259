"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's
rounding error over the not-yet-quantized columns through the inverse Hessian.

Given ``W`` (rows, cols) and the proxy Hessian ``H = (2/n)·Σ xᵀx`` of the layer's inputs,
GPTQ walks the columns in order (or, with ``act_order``, in descending ``diag(H)``); column
``j`` is rounded with the format's own ``quantize`` / ``dequantize`` and the scaled error
``e = (w_j − ŵ_j) / U[j, j]`` is subtracted from the later columns as ``e · U[j, j+1:]``,
where ``U`` is the upper Cholesky factor of ``H⁻¹``. Updates are applied lazily: inside a
block of ``block_size`` columns immediately, to the columns after the block once per block.

Scales (and zeros) are the spec's, chosen by ``lowbit.quantizer.choose_qparams`` (so the
spec's ``scale_search`` applies) on tiles of the spec's granularity:

====================  =====================================================================
groups                when a column group's qparams are chosen
====================  =====================================================================
one column group      (PerTensor, PerChannel, a group as wide as the matrix) up front, from W
dynamic (default)     when the loop reaches the group's first column, from the current
                      (error-updated) weights; the lazy block is a multiple of the group
                      width so the group is read from the up-to-date block copy
static                all up front from the original W (required by ``act_order``); groups
                      stay contiguous original columns, so storage is the same as RTN's
====================  =====================================================================

Dead columns (``H[j, j] == 0``: an input that was always zero) are zeroed in ``W`` before
anything else, as in the reference implementation. Codes and grids have exactly the layout of
:func:`lowbit.quantizer.quantize_matrix`; pack them with :func:`lowbit.quantizer.pack_matrix`.
GPTQ relies on every format rounding elementwise once its qparams are fixed (a (rows, 1)
column gives the codes it would get inside a wider block); the tests check it for every format.

Details the paper and the reference code leave open, chosen here:

* dynamic groups of width ``w`` use lazy blocks of ``max(1, block_size // w)·w`` columns;
* ``act_order`` sorts ``diag(H)`` with a stable sort, dead columns (diagonal 0) last (the
  reference sorts them as diagonal 1; they are decoupled from every other column, so the
  result is the same);
* NVFP4's tensor scale, when the caller gives none, comes from W after dead-column zeroing;
* the Cholesky factorizations run in float32, as in the reference; a failed one retries with
  10× the dampening (see :func:`lowbit.algorithms._hessian.inverse_cholesky`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from math import isfinite
from typing import Callable

import torch
from torch import Tensor

from lowbit.algorithms._hessian import MAX_DAMP, dead_columns, inverse_cholesky, one_thread
from lowbit.errors import LowbitError
from lowbit.formats.base import QParams
from lowbit.grouping import empty_grid, grid_put, regions, to_blocks
from lowbit.quantizer import check_weight, choose_qparams
from lowbit.spec import QuantSpec, tile_of

log = logging.getLogger(__name__)

#: relative dampening of ``GPTQ`` (the CLI's default), chosen by measurement; see ``GPTQ``
DEFAULT_DAMP = 1.0


@dataclass(frozen=True)
class GPTQ:
    """How GPTQ runs: the configuration ``lowbit quantize --method gptq`` and ``lowbit.quantize``
    use.

    =============  ========================================================================
    damp           added to diag(H) as a fraction of its mean, in [0, 10]; grows ×10 on failure
    block_size     columns per lazy update (rounded to whole groups for dynamic groups)
    act_order      visit columns in descending diag(H) (needs static groups)
    static_groups  choose group qparams up front from W; None = exactly when ``act_order``
    =============  ========================================================================

    These field defaults are the only defaults: the function :func:`gptq` takes its keyword
    defaults from them. They were chosen by measurement (``bench/gptq.py``, BENCHMARKS.md), not
    taken from the paper, whose reference code uses damp 0.01 without act-order. On SmolLM2-135M, calibrated on pydoc and scored on pydoc and on
    English prose, act-order was the largest single gain in both domains (``uint4_fz:g64:hqq``,
    damp 1: pydoc perplexity 17.51 → 16.25, prose 30.70 → 29.08), and damp 1 balanced the two
    domains best with act-order (damp 0.1 fits pydoc closer and prose looser, damp 10 the
    reverse; without act-order damp 0.01 made prose worse than round-to-nearest). One small
    model was measured; other models may prefer other values.
    """

    damp: float = DEFAULT_DAMP
    block_size: int = 128
    act_order: bool = True
    static_groups: bool | None = None

    def __post_init__(self) -> None:
        d = self.damp
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (isfinite(d) and 0 <= d <= MAX_DAMP):
            raise LowbitError(f"GPTQ damp {d!r} is not allowed; use a fraction of mean(diag H) in "
                              f"[0, {MAX_DAMP:g}], usually 0.01")
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise LowbitError(f"GPTQ block_size {b!r} must be a positive integer, usually 128")
        if not isinstance(self.act_order, bool):
            raise LowbitError(f"GPTQ act_order {self.act_order!r} must be True or False")
        if self.static_groups is not None and not isinstance(self.static_groups, bool):
            raise LowbitError(f"GPTQ static_groups {self.static_groups!r} must be True, False or None")
        if self.act_order and self.static_groups is False:
            raise LowbitError("GPTQ act_order=True visits columns out of order, so group scales must be "
                              "chosen up front; use static_groups=True or leave it None")

    @property
    def static(self) -> bool:
        """Whether group qparams are chosen up front from the original weight."""
        return self.act_order if self.static_groups is None else self.static_groups

    def solve(self, W: Tensor, H: Tensor, spec: QuantSpec, global_scale: Tensor | None = None,
              keep: Tensor | None = None) -> "GPTQResult":
        """:func:`gptq` with this configuration."""
        return gptq(W, H, spec, damp=self.damp, block_size=self.block_size, act_order=self.act_order,
                    static_groups=self.static_groups, global_scale=global_scale, keep=keep)


@dataclass(frozen=True)
class GPTQResult:
    """Output of :func:`gptq`.

    codes:        (rows, cols) uint8, original column order.
    scale, zero:  (ceil(rows/tr), ceil(cols/tc)) float32 grids as ``quantize_matrix`` returns
                  them; ``zero`` is None for formats without a zero point.
    global_scale: () float32 or None, to pass to ``pack_matrix``.
    damp_used:    the relative dampening that made H positive definite (>= the one asked).
    loss:         ``½·tr(ΔW H_d ΔWᵀ)`` with the dampened H_d, i.e. the mean over tokens of the
                  squared output error summed over rows (GPTQ's running error, summed).
    dead:         number of dead input columns (zeroed before quantization).
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    global_scale: Tensor | None
    damp_used: float
    loss: float
    dead: int


class _Qparams:
    """Per-column qparams of one weight: the stored grids plus their per-element expansion.

    ``ST`` / ``ZT`` (cols, rows) float32 hold, in processing order and transposed, the scale /
    zero of the tile that owns every element, so column ``j`` reads the contiguous row ``ST[j]``
    with no per-column work.
    """

    def __init__(self, spec: QuantSpec, shape: tuple[int, int], tile: tuple[int, int],
                 global_scale: Tensor | None, device: torch.device) -> None:
        self.spec, self.shape, self.tile, self.gs = spec, shape, tile, global_scale
        self.scale = empty_grid(shape, tile).to(device)
        self.zero = empty_grid(shape, tile).to(device) if spec.format.zero_kind else None
        self.row_tile = torch.arange(shape[0], device=device) // tile[0]  # (rows,) grid row of each row
        self.ST: Tensor | None = None  # (cols, rows), filled by choose_all or choose_group
        self.ZT: Tensor | None = None

    def _choose(self, m: Tensor, tile: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
        """Grids (ceil(r/tr), ceil(c/tc)) of qparams for the tiles of a (r, c) matrix ``m``."""
        scale = empty_grid(tuple(m.shape), tile).to(m.device)
        zero = torch.empty_like(scale) if self.zero is not None else None
        for region in regions(tuple(m.shape), tile):
            qp = choose_qparams(to_blocks(m, region), self.spec, self.gs)  # (n_blocks, 1)
            grid_put(scale, region, qp.scale)
            if zero is not None:
                grid_put(zero, region, qp.zero)
        return scale, zero

    def choose_all(self, W: Tensor, perm: Tensor | None) -> None:
        """Static: every tile from ``W`` (rows, cols), original order; expand in ``perm`` order."""
        self.scale, self.zero = self._choose(W, self.tile)
        col_tile = torch.arange(W.shape[1], device=W.device) // self.tile[1]  # (cols,) grid column
        if perm is not None:
            col_tile = col_tile[perm]
        self.ST = self.scale[self.row_tile][:, col_tile].T.contiguous()  # (cols, rows)
        if self.zero is not None:
            self.ZT = self.zero[self.row_tile][:, col_tile].T.contiguous()

    def choose_group(self, j: int, slab: Tensor) -> None:
        """Dynamic: the column group starting at column ``j`` from its current weights ``slab`` (rows, w)."""
        w, g = slab.shape[1], j // self.tile[1]
        if self.ST is None:  # first group: allocate the (cols, rows) expansions
            self.ST = slab.new_empty(self.shape[::-1])
            self.ZT = torch.empty_like(self.ST) if self.zero is not None else None
        scale, zero = self._choose(slab, (self.tile[0], w))  # (grid_rows, 1)
        self.scale[:, g:g + 1] = scale
        self.ST[j:j + w] = scale[self.row_tile].T  # (1, rows) broadcast over the group
        if zero is not None:
            self.zero[:, g:g + 1] = zero
            self.ZT[j:j + w] = zero[self.row_tile].T

    def column(self, j: int) -> QParams:
        """QParams of column ``j`` (processing order) for a (rows, 1) block stack."""
        zero = None if self.ZT is None else self.ZT[j].unsqueeze(1)
        return QParams(self.ST[j].unsqueeze(1), zero, self.gs)


@torch.no_grad()
def gptq(W: Tensor, H: Tensor, spec: QuantSpec, *, damp: float = GPTQ.damp, block_size: int = GPTQ.block_size,
         act_order: bool = GPTQ.act_order, static_groups: bool | None = GPTQ.static_groups,
         global_scale: Tensor | None = None, keep: Tensor | None = None) -> GPTQResult:
    """Quantize a (rows, cols) matrix view with GPTQ.

    W: (rows, cols) float (copied to float32; not modified). H: (cols, cols) float proxy
    Hessian ``(2/n)·Σ xᵀx`` of the inputs (see ``HessianStats``), moved to W's device.
    ``global_scale`` (NVFP4's tensor scale): None computes the format's own from W after
    dead-column zeroing. ``damp``, ``block_size``, ``act_order``, ``static_groups``: see ``GPTQ``,
    whose field defaults are these keyword defaults (damp 1 with act-order, measured); the
    paper's reference settings are ``damp=0.01, act_order=False``.
    keep: (rows, cols) bool keep-mask of a weight an earlier stage pruned, or None. Pruned weights
    stay exactly zero and their (zero) value counts as error that the later columns absorb, as in
    SparseGPT's joint pruning and quantization with a fixed mask.
    """
    cfg = GPTQ(damp, block_size, act_order, static_groups)  # validates
    if keep is not None and (keep.dtype != torch.bool or keep.shape != W.shape):
        raise LowbitError(f"GPTQ keep-mask must be bool of the weight's shape {tuple(W.shape)}, "
                          f"not {keep.dtype} {tuple(keep.shape)}")
    select = None if keep is None else fixed_mask(keep)
    r = solve_columns(W, H, spec, cfg, global_scale, select)
    return GPTQResult(r.codes, r.scale, r.zero, r.global_scale, r.damp_used, r.loss, r.dead)


@dataclass(frozen=True)
class ColumnResult:
    """What :func:`solve_columns` returns: ``GPTQResult``'s fields, ``codes``/``scale``/``zero``
    None without a spec, plus ``weight`` (rows, cols) float32 (the pruned float weight, when no
    spec is given) and ``keep`` (rows, cols) bool (when a mask selector was given), both in the
    original column order."""

    codes: Tensor | None
    scale: Tensor | None
    zero: Tensor | None
    global_scale: Tensor | None
    damp_used: float
    loss: float
    dead: int
    weight: Tensor | None = None
    keep: Tensor | None = None


#: ``select(i, j, W1, d1)``: at column ``i`` of the lazy block ``W1`` (b, rows), processing-order
#: column ``j`` (= block start + i), with ``d1`` (b,) the block's diagonal of the inverse Cholesky
#: factor, returns the keep-mask (k, rows) bool of columns j .. j+k-1, or None to keep the masks
#: chosen so far. It sees the block's current (error-updated) weights: SparseGPT's adaptive masks.
Selector = Callable[[int, int, Tensor, Tensor], "Tensor | None"]


def fixed_mask(keep: Tensor) -> Callable[[Tensor | None], Selector]:
    """A selector factory for a mask chosen beforehand: ``keep`` (rows, cols) bool, original order.

    solve_columns calls the factory with its column permutation (or None) and gets the selector."""
    def bind(perm: Tensor | None) -> Selector:
        keepT = (keep if perm is None else keep[:, perm]).T.contiguous()  # (cols, rows) processing order

        def select(i: int, j: int, W1: Tensor, d1: Tensor) -> Tensor | None:
            return keepT[j:j + W1.shape[0]].to(W1.device) if i == 0 else None

        return select

    return bind


@torch.no_grad()
def solve_columns(W: Tensor, H: Tensor, spec: QuantSpec | None, cfg: GPTQ, global_scale: Tensor | None = None,
                  select: Callable[[Tensor | None], Selector] | None = None) -> ColumnResult:
    """GPTQ's solve, shared by SparseGPT: quantize (``spec``), prune (``select``) or both.

    ``select`` is a factory called with the column permutation (None without act-order) that
    returns a ``Selector``; None prunes nothing. Without a spec the weights are only pruned and
    the others updated (SparseGPT's pure pruning). Shapes as in :func:`gptq`.
    """
    if W.ndim != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise LowbitError(f"GPTQ needs W (rows, cols) and H (cols, cols); "
                          f"got {tuple(W.shape)} and {tuple(H.shape)}")
    rows, cols = W.shape
    W = W.detach().to(torch.float32, copy=True)
    H = H.detach().to(W.device, torch.float32)
    if spec is not None:
        check_weight(W, spec, rows, cols)
    dead = dead_columns(H)
    if dead.all():
        log.warning("every input column is dead (H is zero: no calibration tokens?); the weight becomes zero")
    W[:, dead] = 0
    qps, gs, dynamic, tile = None, None, False, (rows, cols)
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if cfg.act_order else None
    if spec is not None:
        gs = spec.format.global_scale(W) if global_scale is None else global_scale
        tr, tc = tile_of(spec.granularity, rows, cols)
        tile = (min(tr, rows), min(tc, cols))
        qps = _Qparams(spec, (rows, cols), tile, gs, W.device)
        dynamic = not cfg.static and tile[1] < cols
        if not dynamic:
            qps.choose_all(W, perm)
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]  # H is now this function's own copy
    Hinv, damp_used, _ = inverse_cholesky(H, cfg.damp, overwrite=perm is not None)
    del H  # (cols, cols): not needed by the column loop
    block = max(1, cfg.block_size // tile[1]) * tile[1] if dynamic else cfg.block_size
    out, keep, loss = _column_loop(W, Hinv, qps, spec, block, tile[1] if dynamic else 0,
                                   None if select is None else select(perm))
    if perm is not None:
        unperm = lambda t: None if t is None else torch.empty_like(t).index_copy_(1, perm, t)  # noqa: E731
        out, keep = unperm(out), unperm(keep)
    codes, weight = (out, None) if spec is not None else (None, out)
    return ColumnResult(codes, None if qps is None else qps.scale, None if qps is None else qps.zero, gs,
                        damp_used, loss, int(dead.sum()), weight, keep)


def _column_loop(W: Tensor, Hinv: Tensor, qps: _Qparams | None, spec: QuantSpec | None, block: int,
                 group: int, select: Selector | None = None) -> tuple[Tensor, Tensor | None, float]:
    """GPTQ's numerical kernel on W (rows, cols) float32 in processing order (not modified).

    Hinv: (cols, cols) upper Cholesky factor of the dampened H⁻¹ (same order). ``group`` > 0
    is the dynamic group width (``block`` is a multiple of it); 0 when qparams are ready.
    ``select`` (see ``Selector``) prunes: a pruned weight's target value is 0 and its whole value
    is the error spread over the later columns. Without a spec (``qps`` None) the kept weights
    are their own target (pruning only).
    Works on the transpose ``WT`` (cols, rows) so that a column is a contiguous row.
    Returns (codes (rows, cols) uint8 — or the pruned float32 weight without a spec —, the keep
    mask (rows, cols) bool or None, ``½·Σ e²`` (see ``GPTQResult.loss``)), in processing order.
    """
    fmt = None if spec is None else spec.format
    WT = W.T.contiguous()  # (cols, rows)
    outT = torch.empty(WT.shape, dtype=torch.uint8 if fmt else torch.float32, device=W.device)  # (cols, rows)
    keepT = None if select is None else torch.ones(WT.shape, dtype=torch.bool, device=W.device)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    cols = WT.shape[0]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = WT[i1:i2]  # (b, rows): the block, kept up to date column by column (a view)
        Hinv1 = Hinv[i1:i2, i1:i2]  # (b, b)
        Err1 = torch.empty_like(W1)  # (b, rows) scaled errors e_j
        with one_thread(W.device):  # tiny per-column ops: thread sync costs more than it saves
            for i in range(i2 - i1):
                j = i1 + i
                if group and j % group == 0:
                    qps.choose_group(j, W1[i:i + group].T.contiguous())  # (rows, w)
                if select is not None:
                    chosen = select(i, j, W1, Hinv1.diagonal())
                    if chosen is not None:
                        keepT[j:j + chosen.shape[0]] = chosen
                if fmt is not None:
                    qp = qps.column(j)
                    c = fmt.quantize(W1[i].unsqueeze(1), qp)  # (rows, 1) uint8
                    outT[j] = c.view(-1)
                    q = fmt.dequantize(c, qp).view(-1)  # (rows,)
                else:
                    q = W1[i]
                if keepT is not None:
                    q = torch.where(keepT[j], q, 0.0)  # +0.0 where pruned
                if fmt is None:
                    outT[j] = q
                e = torch.sub(W1[i], q, out=Err1[i])  # (rows,)
                e.div_(Hinv1[i, i])
                W1[i + 1:].addr_(Hinv1[i, i + 1:], e, alpha=-1.0)  # (b-i-1, rows) -= outer(U[i, i+1:], e)
        loss += Err1.double().square().sum()
        WT[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1.0)  # lazy update of the later columns
    return outT.T.contiguous(), None if keepT is None else keepT.T.contiguous(), float(loss) / 2
