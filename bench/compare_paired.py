"""Two finished cells of the side-by-side harness, paired window by window.

    python3 bench/compare_paired.py lowbit:signround-w4g64-signed-scale autoround:signround-light-w4-g64-sym

Both cells scored the same evaluation windows (``bench/compare.py`` checks their hashes). For each
corpus it prints the mean per-token log-perplexity difference A − B over the windows with a 95%
Student-t interval, and the perplexity ratio it implies: a negative difference whose interval
excludes 0 means A is better there. Reads ``bench/out/compare/<model>/cells/`` (``--cells-dir``).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from scipy import stats

ROOT = Path(__file__).resolve().parent


def load_cell(cells: Path, key: str) -> dict:
    """The finished cell ``tool:method-key`` (any windows tag), or exit naming what exists."""
    found = sorted(cells.glob(key.replace(":", "__", 1) + "-w*.json"))
    if not found:
        known = sorted(re.sub(r"-w\d+-l\d+.*$", "", p.stem).replace("__", ":", 1) for p in cells.glob("*.json"))
        sys.exit(f"no finished cell {key!r} in {cells}; finished: {', '.join(known)}")
    cell = json.loads(found[-1].read_text())
    if "error" in cell:
        sys.exit(f"cell {key!r} failed: {cell['error'][:200]}")
    return cell


def paired(a: dict, b: dict, corpus: str) -> tuple[float, float, int]:
    """(mean log-perplexity difference a − b per token, half-width of its 95% interval, windows)."""
    xa, xb = a[corpus]["window_nll"], b[corpus]["window_nll"]
    if len(xa) != len(xb) or a[corpus]["tokens"] != b[corpus]["tokens"]:
        sys.exit(f"{corpus}: the cells scored different windows ({len(xa)} and {len(xb)}); rerun one")
    per_window = a[corpus]["tokens"] / len(xa)
    d = [(p - q) / per_window for p, q in zip(xa, xb)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n), n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="cell key, e.g. lowbit:signround-w4g64-signed-scale")
    ap.add_argument("b", help="the cell it is compared with")
    ap.add_argument("--cells-dir", type=Path, default=ROOT / "out" / "compare" / "smollm2-135m" / "cells")
    args = ap.parse_args(argv)
    a, b = load_cell(args.cells_dir, args.a), load_cell(args.cells_dir, args.b)
    if a.get("windows_sha256") != b.get("windows_sha256"):
        sys.exit("the two cells were scored on different windows; rerun one with the other's settings")
    for corpus in ("pydoc", "prose"):
        mean, half, n = paired(a, b, corpus)
        verdict = "A better" if mean + half < 0 else "B better" if mean - half > 0 else "level"
        print(f"{corpus}: log ppl A − B {mean:+.4f} ± {half:.4f} (95%, {n} windows), ppl ratio "
              f"{math.exp(mean):.4f}: {verdict}")


if __name__ == "__main__":
    main()
