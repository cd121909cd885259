"""Perplexity of a causal language model on fixed token windows.

Each window ``(L,)`` is scored on its own (no stride, no carried context): the model sees
the whole window once and the tokens at positions ``1 .. L-1`` are predicted from their
prefix, so a window contributes ``L - 1`` predicted tokens. Log-probabilities are taken in
float32 whatever the model's dtype. Only one batch of logits is alive at a time.

The helpers here (``next_token_logprobs``, ``token_nll``, ``batches``) are shared with
``lowbit.eval.kl``.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lowbit.errors import LowbitError

Model = Callable[[Tensor], Any]  # input_ids (B, L) -> logits (B, L, V) or an output with .logits


@dataclass(frozen=True)
class EvalResult:
    """Perplexity over a set of windows.

    ``ppl = exp(nll)``; ``nll`` is the mean negative log-likelihood in nats per predicted
    token; ``tokens`` counts predicted tokens (``n_windows * (seq_len - 1)``); ``seconds`` is
    the wall time of the whole loop.
    """

    ppl: float
    nll: float
    tokens: int
    seconds: float


def check_windows(windows: Tensor, batch_size: int = 1) -> None:
    """Raise ``LowbitError`` unless ``windows`` is a non-empty integer ``(n, L)`` tensor with L >= 2."""
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise LowbitError(f"windows of shape {tuple(windows.shape)} are not usable; pass an (n, seq_len) "
                          "token tensor with n >= 1 and seq_len >= 2 (see lowbit.eval.token_windows)")
    if windows.dtype.is_floating_point or windows.dtype.is_complex:
        raise LowbitError(f"windows have dtype {windows.dtype}; pass integer token ids (torch.long)")
    if batch_size < 1:
        raise LowbitError(f"batch_size {batch_size} must be a positive integer")


def device_of(model: Any, default: torch.device) -> torch.device:
    """Where ``model`` wants its inputs: ``model.device``, else its first parameter's, else ``default``."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    if isinstance(model, torch.nn.Module):
        param = next(model.parameters(), None)
        if param is not None:
            return param.device
    return default


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Put an ``nn.Module`` in eval mode (no dropout) for the block, then restore its mode."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def next_token_logprobs(model: Model, input_ids: Tensor) -> Tensor:
    """float32 log-probabilities of the next token at every position but the last.

    Args:
        model: a Hugging Face causal LM (output with ``.logits``) or a callable returning logits.
        input_ids: ``(B, L)`` integer tokens on the model's device.

    Returns:
        ``(B, L-1, V)`` float32; row ``t`` is ``log P(x_{t+1} | x_0..x_t)``.
    """
    out = model(input_ids)
    logits = out if isinstance(out, Tensor) else out.logits  # (B, L, V)
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, L-1, V)


def token_nll(logp: Tensor, input_ids: Tensor) -> Tensor:
    """Negative log-likelihood of each predicted token.

    Args:
        logp: ``(B, L-1, V)`` float32 from ``next_token_logprobs``.
        input_ids: ``(B, L)`` the same window.

    Returns:
        ``(B, L-1)`` float32, ``-log P(x_t | x_<t)`` for ``t = 1 .. L-1``.
    """
    targets = input_ids[:, 1:].to(logp.device, torch.long)  # (B, L-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, L-1)


def batches(windows: Tensor, batch_size: int, progress: bool, desc: str) -> Iterator[Tensor]:
    """Yield ``(b, L)`` chunks of ``windows`` (b <= batch_size) with a tqdm bar counting windows."""
    from tqdm.auto import tqdm

    with tqdm(total=windows.shape[0], desc=desc, unit="window", disable=not progress, leave=False) as bar:
        for chunk in windows.split(batch_size):
            yield chunk
            bar.update(chunk.shape[0])


def perplexity(model: Model, windows: Tensor, batch_size: int = 1, progress: bool = True) -> EvalResult:
    """Perplexity of ``model`` on ``windows``: one forward per batch of windows.

    Args:
        model: a Hugging Face causal LM or a callable ``(B, L) long -> (B, L, V) logits``.
        windows: ``(n, L)`` integer tokens, L >= 2 (from ``token_windows``); moved to the
            model's device batch by batch.
        batch_size: windows per forward; windows all have length L, so no padding is needed.
        progress: show a progress bar.

    Returns:
        ``EvalResult`` with ``ppl = exp(sum NLL / (n * (L - 1)))``; NLL is summed in float64.
    """
    check_windows(windows, batch_size)
    device = device_of(model, windows.device)
    nll_sum, tokens = 0.0, 0
    start = time.perf_counter()
    with torch.inference_mode(), eval_mode(model):
        for chunk in batches(windows, batch_size, progress, "perplexity"):
            ids = chunk.to(device)  # (b, L)
            nll = token_nll(next_token_logprobs(model, ids), ids)  # (b, L-1)
            nll_sum += nll.double().sum().item()
            tokens += nll.numel()
    seconds = time.perf_counter() - start
    mean = nll_sum / tokens
    return EvalResult(ppl=math.exp(mean), nll=mean, tokens=tokens, seconds=seconds)
