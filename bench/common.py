"""Shared benchmark plumbing: one set of windows, cached reference log-probs, one scorer.

The reference model's log-probabilities are computed once per window and kept in memory
(16 windows × 511 positions × 49152 vocab × 4 bytes ≈ 1.6 GB for SmolLM2), so each quantized
model costs one forward per window.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from lowbit.eval.kl import token_kl
from lowbit.eval.perplexity import next_token_logprobs, token_nll


@torch.inference_mode()
def reference_logprobs(model, windows: torch.Tensor) -> list[torch.Tensor]:
    """(n, L) windows -> n tensors (1, L-1, V) float32 of the reference's log-probabilities."""
    model.eval()
    return [next_token_logprobs(model, w[None]) for w in windows]


@torch.inference_mode()
def score(model, windows: torch.Tensor, ref: list[torch.Tensor]) -> dict:
    """Perplexity of ``model`` and mean KL(P_ref || P_model) on the same windows."""
    model.eval()
    t0 = time.perf_counter()
    nll = kl = 0.0
    n = 0
    for w, ref_logp in zip(windows, ref):
        logp = next_token_logprobs(model, w[None])
        nll += float(token_nll(logp, w[None]).double().sum())
        kl += float(token_kl(logp, ref_logp).double().sum())
        n += logp.shape[1]
    return {"ppl": math.exp(nll / n), "kl": kl / n, "tokens": n, "eval_seconds": time.perf_counter() - t0}


def write_section(path: Path, begin: str, end: str, lines: list[str]) -> None:
    """Replace the text between the markers ``begin`` and ``end`` of ``path`` (appended if absent).

    ``lines`` include both markers.
    """
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin not in text:
        text += "\n" + begin + "\n" + end + "\n"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    path.write_text(head + "\n".join(lines) + tail)
