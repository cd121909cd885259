"""How long does round-to-nearest take on SmolLM2-135M, in process (model already loaded)?

    python3 bench/rtn_time.py [--scheme w4g64] [--runs 5]

Each run quantizes a fresh deep copy of the loaded model with ``lowbit.quantize(model, scheme)``
(method rtn, no progress bar); prints the median, minimum and maximum seconds.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import lowbit
from lowbit.hf.load import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheme", default="w4g64")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    model = load_model("smollm2-135m").model
    seconds = []
    for _ in range(args.runs):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        lowbit.quantize(m, args.scheme, progress=False)
        seconds.append(time.perf_counter() - t0)
        del m
    print(f"rtn {args.scheme}: median {statistics.median(seconds):.3f} s, min {min(seconds):.3f}, "
          f"max {max(seconds):.3f} over {args.runs} runs")


if __name__ == "__main__":
    main()
