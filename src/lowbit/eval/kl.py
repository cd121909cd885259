"""KL divergence of a compressed model from its reference, with both perplexities.

For every predicted position (positions ``0 .. L-2`` of each window, the ones that predict
tokens ``1 .. L-1``) we take the float32 log-softmax of both models over the full
vocabulary and compute

    KL(P_ref || P_model) = sum_v P_ref(v) * (log P_ref(v) - log P_model(v))   [nats]

then average over positions. Each model runs one forward per window; the same
log-probabilities give both models' NLL, so ``ppl``, ``ref_ppl`` and ``kl`` come from one pass.
Only one batch of logits per model is alive at a time.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lowbit.eval.perplexity import (
    Model,
    batches,
    check_windows,
    device_of,
    eval_mode,
    next_token_logprobs,
    perplexity,
    token_nll,
)


@dataclass(frozen=True)
class KLResult:
    """Mean KL(P_ref || P_model) in nats per predicted position, plus both perplexities.

    ``nll`` is the model's mean NLL per predicted token (``ppl = exp(nll)``); ``tokens`` counts
    predicted positions; ``seconds`` is the wall time of the loop (both models' forwards).
    """

    kl: float
    ppl: float
    ref_ppl: float
    nll: float
    tokens: int
    seconds: float


def token_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-position ``KL(P_ref || P_model)`` in nats.

    Args:
        logp: ``(B, T, V)`` float32 log-probabilities of the model.
        ref_logp: ``(B, T, V)`` float32 log-probabilities of the reference.

    Returns:
        ``(B, T)`` float32, clamped at 0 (negative values are only rounding noise).
    """
    ref_logp = ref_logp.to(logp.device)
    p = ref_logp.exp()
    terms = torch.where(p > 0, p * (ref_logp - logp), torch.zeros_like(p))  # 0·log 0 = 0, no NaN
    return terms.sum(-1).clamp_min(0.0)  # (B, T)


def kl_divergence(model: Model, reference: Model, windows: Tensor, batch_size: int = 1,
                  progress: bool = True) -> KLResult:
    """KL of ``model`` from ``reference`` on ``windows``, with both perplexities, in one pass.

    Args:
        model: the compressed model (HF causal LM or callable ``(B, L) -> (B, L, V)`` logits).
        reference: the original model; same vocabulary ``V``. It may live on another device.
        windows: ``(n, L)`` integer tokens, L >= 2.
        batch_size: windows per forward.
        progress: show a progress bar.

    Returns:
        ``KLResult``; sums are accumulated in float64.
    """
    check_windows(windows, batch_size)
    device, ref_device = device_of(model, windows.device), device_of(reference, windows.device)
    kl_sum = nll_sum = ref_nll_sum = 0.0
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode(), eval_mode(model), eval_mode(reference):
        for chunk in batches(windows, batch_size, progress, "kl"):
            ref_logp = next_token_logprobs(reference, chunk.to(ref_device))  # (b, L-1, V)
            ref_nll_sum += token_nll(ref_logp, chunk).double().sum().item()
            ids = chunk.to(device)  # (b, L)
            logp = next_token_logprobs(model, ids)  # (b, L-1, V)
            nll = token_nll(logp, ids)  # (b, L-1)
            nll_sum += nll.double().sum().item()
            kl_sum += token_kl(logp, ref_logp).double().sum().item()
            tokens += nll.numel()
            del ref_logp, logp
    seconds = time.perf_counter() - start
    mean_nll = nll_sum / tokens
    return KLResult(kl=kl_sum / tokens, ppl=math.exp(mean_nll), ref_ppl=math.exp(ref_nll_sum / tokens),
                    nll=mean_nll, tokens=tokens, seconds=seconds)


def evaluate(model: Model, windows: Tensor, reference: Model | None = None, batch_size: int = 1,
             progress: bool = True) -> dict[str, Any]:
    """Everything the CLI reports, one forward per model per batch of windows.

    Returns:
        ``{"ppl", "nll", "tokens", "seconds"}``, plus ``"kl"`` and ``"ref_ppl"`` when a
        ``reference`` is given (see ``kl_divergence``).
    """
    if reference is None:
        r = perplexity(model, windows, batch_size=batch_size, progress=progress)
        return {"ppl": r.ppl, "nll": r.nll, "tokens": r.tokens, "seconds": r.seconds}
    k = kl_divergence(model, reference, windows, batch_size=batch_size, progress=progress)
    return {"ppl": k.ppl, "nll": k.nll, "tokens": k.tokens, "seconds": k.seconds,
            "kl": k.kl, "ref_ppl": k.ref_ppl}
