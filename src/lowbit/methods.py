"""Quantization methods by name: data-free ones act per tensor, calibrated ones run in ``run.py``.

A calibrated method is an object with

* ``new_stats(cols) -> stats``: an accumulator with ``update(x)`` for inputs (tokens, cols);
* ``solve(W, stats, spec, global_scale) -> (codes, scale, zero, info)``: W (rows, cols) float32
  matrix view; codes (rows, cols) uint8 and the scale / zero grids as ``quantize_matrix``
  returns them; ``info`` a JSON-able dict for the run report.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lowbit.algorithms._hessian import HessianStats
from lowbit.algorithms.gptq import GPTQ
from lowbit.errors import LowbitError
from lowbit.spec import QuantSpec

DATA_FREE = ("rtn", "nupes")
CALIBRATED = ("gptq",)


@dataclass(frozen=True)
class GPTQMethod:
    """GPTQ on the Hessian of each layer's inputs."""

    config: GPTQ = GPTQ()
    name = "gptq"

    def new_stats(self, cols: int) -> HessianStats:
        return HessianStats(cols)

    def solve(self, W: Tensor, stats: HessianStats, spec: QuantSpec, global_scale: Tensor | None
              ) -> tuple[Tensor, Tensor, Tensor | None, dict[str, Any]]:
        r = self.config.solve(W, stats.H, spec, global_scale)
        info = {"tokens": stats.n, "damp": r.damp_used, "loss": r.loss, "dead": r.dead}
        return r.codes, r.scale, r.zero, info


def calibrated(method: str, **options: Any) -> GPTQMethod:
    """The calibrated method ``method`` with its options (e.g. damp=0.01, act_order=True)."""
    if method == "gptq":
        return GPTQMethod(GPTQ(**options))
    raise LowbitError(f"unknown calibrated method {method!r}; available: {', '.join(CALIBRATED)}")


def all_methods() -> tuple[str, ...]:
    return DATA_FREE + CALIBRATED
