"""The one evaluator of the side-by-side benchmark, run inside each tool's own environment.

``bench/compare.py`` prepares a work folder once per model (in lowbit's environment):

* ``windows.safetensors``: ``pydoc`` and ``prose`` (n, L) int64 evaluation windows, ``calib``
  (s, L) int64 calibration windows, ``prompt`` (1, P) int64 decode prompt;
* ``reference.safetensors``: the fp32 model's next-token log-probabilities, ``<corpus>.<i>``
  (L-1, V) float32 for window ``i``, memory-mapped here rather than recomputed;
* ``work.json``: the model folder, decode length and the SHA-256 of every window tensor.

A tool's runner (``bench/peers/<tool>_quant.py --work DIR``; it imports this module as ``peer_eval``) loads the model, quantizes it,
saves it in the tool's own format, then calls :func:`finish` with the live quantized model,
which is exactly what the tool runs (its own modules and kernels). :func:`finish` reads the
peak RSS first (``VmHWM``: loading plus quantizing plus saving, the same for every tool), then
scores the model on the same windows with lowbit's own perplexity and KL code, times greedy
decoding, and writes ``result.json``. Only torch, safetensors and ``lowbit.eval`` are needed,
so it runs under any tool's pinned transformers.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lowbit.eval.kl import token_kl
from lowbit.eval.perplexity import next_token_logprobs, token_nll

CORPORA = ("pydoc", "prose")


def digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes: the harness's check that every tool saw the same windows."""
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def windows(work: Path) -> dict[str, torch.Tensor]:
    """The work folder's token tensors: pydoc, prose, calib, prompt (int64)."""
    return load_file(str(Path(work) / "windows.safetensors"))


def calibration(work: Path) -> torch.Tensor:
    """(samples, seq_len) int64 calibration windows, the same for every calibrated tool."""
    return windows(work)["calib"]


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (``VmHWM``: its own, not a parent's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak RSS is measured on Linux only")


def group_bpw(shapes: list[tuple[int, int]], bits: int, group: int, overhead_bits: int) -> float:
    """Stored bits per weight of ``bits``-bit codes with ``overhead_bits`` (scale, zero) per group.

    ``shapes``: (rows, cols) of every quantized matrix; ``group`` inputs per group, 0 for one
    group per output row (per channel). A ragged last group counts as a whole group.
    """
    weights = sum(r * c for r, c in shapes)
    groups = sum(r * (-(-c // group) if group else 1) for r, c in shapes)
    return (bits * weights + overhead_bits * groups) / weights


def linear_shapes(model, skip: tuple[str, ...] = ("lm_head",)) -> list[tuple[int, int]]:
    """(out, in) of every ``nn.Linear`` of ``model`` but ``skip`` (call before quantizing)."""
    return [tuple(m.weight.shape) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not name.endswith(skip)]


def folder_bytes(path: Path | None) -> int | None:
    """Bytes of every file under ``path`` (the tool's saved model); None when nothing was saved."""
    if path is None or not Path(path).exists():
        return None
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# no_grad, not inference_mode, for every tool alike: quanto's int4 linear is an autograd.Function
# that fails on inference tensors ("Cannot set version_counter for inference tensor", torch 2.13)
@torch.no_grad()
def perplexity_and_kl(model, ids: torch.Tensor, reference: Path, corpus: str) -> dict:
    """Perplexity and mean KL(P_fp32 ‖ P_model) over (n, L) windows; per-window NLL kept for paired tests."""
    nll = kl = 0.0
    n = 0
    window_nll = []
    with safe_open(str(reference), "pt") as ref:
        for i, w in enumerate(ids):
            logp = next_token_logprobs(model, w[None])  # (1, L-1, V) float32
            window_nll.append(float(token_nll(logp, w[None]).double().sum()))
            nll += window_nll[-1]
            kl += float(token_kl(logp, ref.get_tensor(f"{corpus}.{i}")[None]).double().sum())
            n += logp.shape[1]
    return {"ppl": math.exp(nll / n), "kl": kl / n, "tokens": n, "window_nll": window_nll}


@torch.no_grad()
def decode_speed(model, prompt: torch.Tensor, new_tokens: int, repeats: int = 3) -> dict:
    """Greedy decoding of exactly ``new_tokens`` tokens after ``prompt`` (1, P): tokens per second.

    One short warm-up generation first (kernel selection, caches), then ``repeats`` timed
    generations; the median is reported (a single 64-token run on a shared 2-core machine varied
    by up to 40% between identical dense models). Each timed call includes the prompt's prefill,
    as a user's generate call would.
    """
    kwargs = dict(do_sample=False, pad_token_id=0)
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **kwargs)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        runs.append(time.perf_counter() - t0)
    made = out.shape[1] - prompt.shape[1]
    seconds = sorted(runs)[len(runs) // 2]
    return {"decode_tokens": made, "decode_seconds": seconds, "decode_tok_s": made / seconds,
            "decode_runs_s": runs, "decode_text_ids": out[0, prompt.shape[1]:].tolist()}


def finish(out: Path, model, work: Path | None, **fields) -> dict:
    """Record a finished quantization: peak RSS now, then (with ``work``) quality and speed.

    ``fields`` are the tool's own: ``tool``, ``version``, ``quantize_seconds``, ``bpw``,
    ``saved`` (folder of the tool's own save, for the size on disk) and anything else worth
    keeping. Writes ``out/result.json`` atomically and returns it.
    """
    result = {"peak_rss_mb": peak_rss_mb(), **fields}
    saved = result.pop("saved", None)
    result["size_bytes"] = folder_bytes(saved)
    result["torch_threads"] = torch.get_num_threads()
    if work is not None:
        work = Path(work)
        meta = json.loads((work / "work.json").read_text())
        ids = windows(work)
        model.eval()
        t0 = time.perf_counter()
        for corpus in CORPORA:
            result[corpus] = perplexity_and_kl(model, ids[corpus], work / "reference.safetensors", corpus)
        result["eval_seconds"] = time.perf_counter() - t0
        result.update(decode_speed(model, ids["prompt"], meta["decode_tokens"]))
        result["windows_sha256"] = {k: digest(v) for k, v in ids.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
    os.replace(tmp, out / "result.json")
    print(json.dumps({k: v for k, v in result.items() if k not in CORPORA and k != "decode_text_ids"}))
    return result
