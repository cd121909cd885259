"""Evaluation: corpus windows, perplexity and KL divergence against a reference model.

Nothing here imports transformers; tokenizers and models are passed in.

    >>> from lowbit.eval import eval_text, token_windows, evaluate
    >>> windows = token_windows(tokenizer, eval_text(None), seq_len=512, n_windows=40)
    >>> evaluate(quantized, windows, reference=original)  # {"ppl", "nll", "tokens", "seconds", "kl", "ref_ppl"}
"""
from __future__ import annotations

from lowbit.eval.corpus import eval_text, load_text, pydoc_text, split_pydoc, token_windows
from lowbit.eval.kl import KLResult, evaluate, kl_divergence
from lowbit.eval.perplexity import EvalResult, perplexity

__all__ = [
    "EvalResult",
    "KLResult",
    "eval_text",
    "evaluate",
    "kl_divergence",
    "load_text",
    "perplexity",
    "pydoc_text",
    "split_pydoc",
    "token_windows",
]
