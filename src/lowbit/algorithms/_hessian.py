"""Shared Hessian helpers for the second-order methods (GPTQ, SparseGPT).

For a linear layer ``y = x Wᵀ`` the layer loss ``mean_tokens ||(W − Ŵ) xᵀ||²`` is the quadratic
form ``½·tr(ΔW H ΔWᵀ)`` with the proxy Hessian ``H = (2/n)·Σ xᵀx`` over the ``n`` calibration
tokens. ``HessianStats`` accumulates that ``H``; ``inverse_cholesky`` turns it into the upper
Cholesky factor of ``H⁻¹`` that GPTQ's column loop reads, after fixing dead columns and
dampening the diagonal.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

#: Largest relative dampening tried before giving up (``damp`` is a multiple of mean(diag H)).
MAX_DAMP = 10.0
#: First retry when the caller asked for ``damp=0`` (guess: ×10 of zero would stay zero).
FIRST_RETRY_DAMP = 1e-3


class HessianStats:
    """Running ``H = (2/n)·Σ xᵀx`` over every token seen; ``H`` (cols, cols) float32.

    ``update`` costs one ``xᵀx`` product (an in-place ``addmm_`` that also rescales the old
    mean), so it can run inside a forward hook. ``device=None`` keeps ``H`` on the device of
    the first input; a given device (e.g. "cpu" to spare accelerator memory) receives every
    input there. Before any update ``H`` is all zeros and ``n`` is 0.
    """

    def __init__(self, cols: int, device: torch.device | str | None = None) -> None:
        if cols < 1:
            raise LowbitError(f"Hessian needs at least one column, got {cols}")
        self.H = torch.zeros(cols, cols, dtype=torch.float32, device=device)
        self.n = 0
        self._follow_input = device is None

    @property
    def cols(self) -> int:
        return self.H.shape[0]

    def update(self, x: Tensor) -> None:
        """Add tokens ``x`` (..., cols), any float dtype; leading dimensions are flattened."""
        if x.shape[-1] != self.cols:
            raise LowbitError(f"input has {x.shape[-1]} features but the Hessian has {self.cols} columns")
        if self._follow_input and self.n == 0 and x.device != self.H.device:
            self.H = self.H.to(x.device)
        x = x.detach().reshape(-1, self.cols).to(self.H.device, torch.float32)  # (tokens, cols)
        tokens = x.shape[0]
        if tokens == 0:
            return
        total = self.n + tokens
        # H ← (n/total)·H + (2/total)·xᵀx, one fused product
        self.H.addmm_(x.T, x, beta=self.n / total, alpha=2.0 / total)
        self.n = total


def dead_columns(H: Tensor) -> Tensor:
    """(cols,) bool: inputs that were always zero (``H[j, j] == 0``)."""
    return H.diagonal() == 0


def _finite(x: Tensor) -> bool:
    """Whether every entry is finite: one float64 sum (cannot overflow for float32 inputs)."""
    return bool(torch.isfinite(x.sum(dtype=torch.float64)))


def _try_cholesky(H: Tensor) -> Tensor | None:
    """Upper Cholesky factor of ``H⁻¹`` (GPTQ's ``Hinv``), or None if ``H`` is not numerically PD."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0 or not _finite(L):
        return None
    Linv = torch.cholesky_inverse(L)
    del L  # (cols, cols) each: keep at most two alive (8640 columns: 300 MB apiece)
    U, info = torch.linalg.cholesky_ex(Linv, upper=True)
    del Linv
    if int(info) != 0 or not _finite(U):
        return None
    return U


def inverse_cholesky(H: Tensor, damp: float = 0.01, *, overwrite: bool = False) -> tuple[Tensor, float, Tensor]:
    """Dampened inverse Cholesky factor for GPTQ.

    H: (cols, cols) float32, symmetric; not modified unless ``overwrite`` (then its diagonal is
    dampened in place, which spares a ``cols × cols`` copy: pass it for a matrix the caller owns
    and no longer needs, such as GPTQ's act-order permutation). Dead columns (zero diagonal) get a
    diagonal of 1 — the caller zeroes the matching weight columns — then
    ``damp·mean(diag H)`` is added to the diagonal and ``U`` with ``H⁻¹ = Uᵀ U`` is computed
    (cholesky → cholesky_inverse → cholesky(upper)). When a factorization fails or gives
    non-finite values, ``damp`` grows ×10 (from ``FIRST_RETRY_DAMP`` when it was 0) up to
    ``MAX_DAMP``.

    Returns ``(Hinv_upper (cols, cols) float32, damp_used, dead (cols,) bool)``.
    Raises ``LowbitError`` when ``H`` is not finite or no dampening up to ``MAX_DAMP`` works.
    """
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise LowbitError(f"Hessian must be a square matrix, got shape {tuple(H.shape)}")
    if not _finite(H):
        raise LowbitError("Hessian has NaN or Inf entries; check the calibration inputs of this layer")
    H = H if overwrite and H.dtype == torch.float32 else H.to(torch.float32, copy=True)
    dead = dead_columns(H)
    diag = torch.where(dead, 1.0, H.diagonal())  # (cols,) dead columns get 1
    mean_diag = diag.mean()
    tried = damp
    while True:
        H.diagonal().copy_(diag + tried * mean_diag)  # our copy, or the caller's to overwrite
        with one_thread(H.device):
            U = _try_cholesky(H)
        if U is not None:
            if tried != damp:
                log.info("Hessian not positive definite at damp %g; used damp %g", damp, tried)
            return U, tried, dead
        tried = tried * 10 if tried > 0 else FIRST_RETRY_DAMP
        if tried > MAX_DAMP * (1 + 1e-9):
            raise LowbitError(
                f"Hessian ({H.shape[0]} columns) is not positive definite even with damp {MAX_DAMP:g} "
                f"(asked {damp:g}); its inputs may be degenerate or non-finite — collect more calibration "
                "tokens, or quantize this layer with rtn"
            )


class one_thread:
    """Run small CPU steps on one thread, then restore the thread count.

    GPTQ's per-column steps touch a few thousand numbers each; with several intra-op threads the
    fork/join of every small op dominates, and on a busy machine spinning threads make it far
    worse (measured: 2-5x slower with 2 threads under load; elementwise results do not depend on
    the thread count). The factorizations of ``inverse_cholesky`` run here too: MKL's threaded
    ``cholesky_inverse`` spent 943 ms of CPU on a 576-column Hessian with 2 threads on a loaded
    2-core machine, against 4.6 ms on one (1536 columns: 896 against 94 ms). Unlike the
    elementwise steps, LAPACK's rounding depends on the thread count, so a factor computed here
    can differ in the last bits from a 2-thread one: the same on every machine, whatever its cores.
    """

    def __init__(self, device: torch.device) -> None:
        self.cpu = device.type == "cpu"
        self.saved = 1

    def __enter__(self) -> None:
        if self.cpu:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        if self.cpu:
            torch.set_num_threads(self.saved)
