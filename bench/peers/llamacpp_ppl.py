"""llama.cpp as the runtime: score given token windows of a GGUF file, logits at every position.

    bench/.venvs/llamacpp/bin/python bench/peers/llamacpp_ppl.py --model M.gguf --windows W.npy --out R.json

Runs inside llama-cpp-python's own virtual environment (``bench/peers/setup_llamacpp.sh``) and
imports no lowbit code: the windows come in as token ids (an ``(n, L)`` integer ``.npy``), so
llama.cpp's tokenizer is not involved. Each window is evaluated from an empty KV cache in one
batch of ``L`` tokens; position ``t`` predicts token ``t + 1``, as in ``lowbit.eval.perplexity``.
``R.json`` holds the negative log-likelihood summed per window (float64 log-softmax of llama.cpp's
float32 logits), the arg-max token at every predicted position, the wall time and versions.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _main import run  # noqa: E402


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(T, V) -> (T, V) float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--windows", required=True, help="(n, L) integer .npy of token ids")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    import llama_cpp

    windows = np.load(args.windows)  # (n, L)
    n, seq_len = windows.shape
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=seq_len, n_batch=seq_len, n_ubatch=seq_len,
                          logits_all=True, n_threads=args.threads, n_threads_batch=args.threads,
                          seed=0, verbose=False)
    window_nll, argmax = [], []
    start = time.perf_counter()
    for w in windows:
        llm.reset()
        llm.eval([int(t) for t in w])
        logp = log_softmax(np.asarray(llm.scores[: seq_len - 1]))  # (L-1, V): row t predicts w[t+1]
        window_nll.append(float(-logp[np.arange(seq_len - 1), w[1:]].sum()))
        argmax.append(logp.argmax(axis=-1).tolist())
    seconds = time.perf_counter() - start
    result = {"window_nll": window_nll, "argmax": argmax, "tokens": n * (seq_len - 1), "seconds": seconds,
              "threads": args.threads, "llama_cpp_python": llama_cpp.__version__,
              "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    run(main)
