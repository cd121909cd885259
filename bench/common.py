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
    window_nll = []  # per window: a paired comparison of two models on the same windows needs them
    for w, ref_logp in zip(windows, ref):
        logp = next_token_logprobs(model, w[None])
        window_nll.append(float(token_nll(logp, w[None]).double().sum()))
        nll += window_nll[-1]
        kl += float(token_kl(logp, ref_logp).double().sum())
        n += logp.shape[1]
    return {"ppl": math.exp(nll / n), "kl": kl / n, "tokens": n, "eval_seconds": time.perf_counter() - t0,
            "window_nll": window_nll}


def read_section(path: Path, begin: str, end: str) -> str:
    """The text between the markers ``begin`` and ``end`` of ``path``; empty if either is absent."""
    text = path.read_text() if path.exists() else ""
    if begin not in text:
        return ""
    return text.partition(begin)[2].partition(end)[0]


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


def hf_folder(source: str, dest: Path) -> Path:
    """An fp32 Hugging Face folder (config, safetensors, tokenizer) of ``source`` at ``dest``.

    Peer tools that only load model folders (llm-compressor) all read this one copy. GGUF
    models are saved dequantized, exactly the weights lowbit loads. Written to a temporary
    folder and renamed into place; an existing ``dest`` is reused.
    """
    import shutil

    from lowbit.hf.load import load_model

    if (dest / "config.json").exists():
        return dest
    loaded = load_model(source)
    model = loaded.model
    model.hf_quantizer = None  # transformers marks GGUF-loaded models as quantized; the weights are fp32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    tmp.rename(dest)
    return dest
