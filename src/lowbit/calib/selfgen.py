"""Self-generated calibration text, as in LLM-QAT (Liu et al. 2023, "LLM-QAT: Data-Free
Quantization Aware Training for Large Language Models").

Each sample starts with one token drawn uniformly from the vocabulary (special tokens
excluded); the next tokens are the model's top-1 choice until the sample's deterministic
prefix is ``k`` tokens long; every later token is drawn from the model's full softmax.
Sample ``i`` uses ``k = prefix_lengths[i % len(prefix_lengths)]``.

What the paper leaves open and was decided here:

* ``prefix_lengths=(3, 4, 5)`` follows the authors' ``generate_data.py`` (a greedy
  ``generate`` to ``max_length`` 3, 4 and 5, then sampling); the paper says "the first 3~5 tokens".
* The first token is drawn uniformly at random; the authors' script walks the vocabulary in order.
* Sampling uses the plain softmax (temperature 1, no top-k or top-p). The authors' script called
  ``generate(do_sample=True)``, whose default (top_k=50 unless the model's generation config
  says otherwise) differs from the paper's wording.
* Generation never stops at an end-of-sequence token: every sample is exactly ``seq_len``
  tokens, so one sample is one calibration window.

Randomness comes only from one CPU ``torch.Generator`` seeded with ``seed`` (first tokens,
then one uniform per row per step, turned into a token by inverse-CDF on the float64
softmax), so the same model, seed and batch size give the same tokens. Samples are
generated ``batch_size`` rows at a time with the KV cache and cached on disk (``cache.py``).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.calib.cache import cache_path, load_tokens, model_fingerprint, save_tokens
from lowbit.errors import LowbitError

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def self_generate(model: nn.Module, tokenizer: Any, n_samples: int, seq_len: int, seed: int = 0, *,
                  batch_size: int = 32, prefix_lengths: Sequence[int] = (3, 4, 5), use_cache: bool = True,
                  progress: bool = True) -> Tensor:
    """``n_samples`` sequences of ``seq_len`` tokens sampled from ``model`` (see the module docstring).

    Args:
        model: a causal LM called as ``model(input_ids=(B, t), past_key_values=..., use_cache=True)``
            that returns ``.logits`` ``(B, t, V)`` and ``.past_key_values`` (any Hugging Face
            ``*ForCausalLM``).
        tokenizer: gives the vocabulary size (``len``) and ``all_special_ids`` to exclude from
            the first token; ``None`` uses ``model.config.vocab_size`` and excludes nothing.
        batch_size: rows generated together; part of the cache key, since it orders the draws.
        use_cache: read and write the on-disk cache.

    Returns:
        ``torch.long`` tensor ``(n_samples, seq_len)`` on the CPU.
    """
    _check_args(n_samples, seq_len, batch_size, prefix_lengths)
    candidates = first_token_candidates(model, tokenizer)
    settings = {"seed": seed, "n_samples": n_samples, "seq_len": seq_len, "batch_size": batch_size,
                "prefix_lengths": list(prefix_lengths), "device": _device(model).type}
    key = {"version": FORMAT_VERSION, "model": model_fingerprint(model), **settings}
    path = cache_path({**key, "candidates": candidates.tolist()})
    tokens = load_tokens(path, (n_samples, seq_len)) if use_cache else None
    if tokens is not None:
        log.info("self-generated calibration samples from cache %s", path)
        return tokens
    tokens = generate(model, candidates, n_samples, seq_len, seed, batch_size, prefix_lengths, progress)
    if use_cache:
        save_tokens(path, tokens, key)
    return tokens


def _check_args(n_samples: int, seq_len: int, batch_size: int, prefix_lengths: Sequence[int]) -> None:
    for name, value, low in (("n_samples", n_samples, 1), ("seq_len", seq_len, 2), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise LowbitError(f"{name} {value!r} must be an integer >= {low}")
    if not prefix_lengths or any(not isinstance(k, int) or k < 1 for k in prefix_lengths):
        raise LowbitError(f"prefix_lengths {tuple(prefix_lengths)!r} must be integers >= 1, e.g. (3, 4, 5)")


def first_token_candidates(model: nn.Module, tokenizer: Any) -> Tensor:
    """Token ids a sample may start with: ``0 .. min(vocab sizes) - 1`` minus special ids; int64 ``(C,)``."""
    sizes = [getattr(getattr(model, "config", None), "vocab_size", None)]
    sizes = [s for s in sizes + ([len(tokenizer)] if tokenizer is not None else []) if s]
    if not sizes:
        raise LowbitError("self-generation needs the vocabulary size: pass a tokenizer or a model with "
                          "config.vocab_size")
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    ids = [i for i in range(min(sizes)) if i not in special]
    if not ids:
        raise LowbitError("every token of the vocabulary is special; self-generation has no first token to draw")
    return torch.tensor(ids, dtype=torch.long)


def _device(model: nn.Module) -> torch.device:
    from lowbit.eval.perplexity import device_of

    return device_of(model, torch.device("cpu"))


@torch.no_grad()
def generate(model: nn.Module, candidates: Tensor, n_samples: int, seq_len: int, seed: int, batch_size: int,
             prefix_lengths: Sequence[int], progress: bool = True) -> Tensor:
    """The uncached generation loop; returns int64 ``(n_samples, seq_len)`` on the CPU."""
    from tqdm.auto import tqdm

    from lowbit.eval.perplexity import eval_mode

    g = torch.Generator().manual_seed(seed)
    first = candidates[torch.randint(len(candidates), (n_samples,), generator=g)]  # (N,)
    prefix = torch.tensor([prefix_lengths[i % len(prefix_lengths)] for i in range(n_samples)])  # (N,)
    tokens = torch.empty(n_samples, seq_len, dtype=torch.long)
    with eval_mode(model), tqdm(total=n_samples * seq_len, desc="self-generate calibration", unit="tok",
                                disable=not progress, leave=False) as bar:
        for lo in range(0, n_samples, batch_size):
            hi = min(lo + batch_size, n_samples)
            tokens[lo:hi] = generate_batch(model, first[lo:hi], prefix[lo:hi], seq_len, g, bar.update)
    return tokens


def generate_batch(model: nn.Module, first: Tensor, prefix: Tensor, seq_len: int, g: torch.Generator,
                   update: Any = None) -> Tensor:
    """One batch: ``first`` (B,) start tokens, ``prefix`` (B,) deterministic lengths -> int64 (B, seq_len).

    Step ``t`` feeds only the newest token and reuses the KV cache; rows with ``t < prefix``
    take the argmax, the others an inverse-CDF draw from the softmax (one uniform per row per
    step from ``g``, drawn for every row so the stream does not depend on ``prefix``).
    """
    device = _device(model)
    tokens = torch.empty(len(first), seq_len, dtype=torch.long)  # (B, L)
    tokens[:, 0] = first
    past = None
    for t in range(1, seq_len):
        out = model(input_ids=tokens[:, t - 1 : t].to(device), past_key_values=past, use_cache=True)
        logits, past = _logits_and_cache(out)
        logits = logits[:, -1].double().cpu()  # (B, V)
        u = torch.rand(len(first), generator=g, dtype=torch.float64)  # (B,)
        tokens[:, t] = torch.where(t < prefix, logits.argmax(-1), sample(logits, u))
        if update is not None:
            update(len(first))
    if update is not None:
        update(len(first))  # the first token
    return tokens


def _logits_and_cache(out: Any) -> tuple[Tensor, Any]:
    logits, past = getattr(out, "logits", None), getattr(out, "past_key_values", None)
    if logits is None or past is None:
        raise LowbitError(f"self-generation needs a causal LM that returns .logits and .past_key_values "
                          f"(a Hugging Face *ForCausalLM); the model returned {type(out).__name__}")
    return logits, past


def sample(logits: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw: ``logits`` (B, V), ``u`` (B,) uniforms in [0, 1) -> int64 (B,) token ids.

    Token ``j`` is chosen with probability ``softmax(logits)[j]``; zero-probability tokens
    are never chosen.
    """
    cdf = torch.softmax(logits.double(), dim=-1).cumsum(-1)  # (B, V)
    target = (u.double() * cdf[:, -1]).unsqueeze(1)  # (B, 1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)  # (B,)
    return idx.clamp_(max=logits.shape[-1] - 1)
