"""How much of round-to-nearest's gap does GPTQ close in published measurements?

    python3 bench/published_gptq.py

lowbit's paired runs (``bench/gptq_paired.py``) measure the share of RTN's gap to full precision
that GPTQ removes on SmolLM2-135M. This script computes the same share from two published
sources, so the figures can be read side by side. No model runs: the inputs are the published
numbers, copied below with their sources, and the output is arithmetic on them.

* The GPTQ authors' README (IST-DASLab/gptq, README.md at commit
  2d65066eeb06a5c9ff5184d8cebdf33662c67faf): LLaMA WikiText-2 perplexity, calibrated on C4, with act-order and
  true-sequential, per-channel (no groups) at 4 and 3 bits. Share = ``(log ppl_RTN − log ppl_GPTQ)
  / (log ppl_RTN − log ppl_FP16)``, as in ``bench/gptq_paired.py``.
* auto-round's comparison (intel/auto-round, docs/paper_acc.md at commit
  9d2ee69872331b6ebfbaa884c23cc5e88e8085f9):
  average zero-shot accuracy over 11 tasks, calibrated on 512 samples of pile-10k, GPTQ with
  act-order, true-sequential and static groups (act-order with static groups is lowbit's default
  too), at W4G128 and W3G128.
  Share = ``(acc_method − acc_RTN) / (acc_FP16 − acc_RTN)``; n/a where RTN is not below FP16.

Both evaluate on other data than they calibrate on, as the prose rows of lowbit's table do.
Writes the section of BENCHMARKS.md between the published-gptq markers.
"""
from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import write_section  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- published-gptq:begin -->", "<!-- published-gptq:end -->"

# IST-DASLab/gptq README, "summary of LLaMa results" (WikiText-2 perplexity).
GPTQ_README = {  # model: (FP16, 4bit RTN, 4bit GPTQ, 3bit RTN, 3bit GPTQ)
    "LLaMA-7B": (5.68, 6.29, 6.09, 25.54, 8.07),
    "LLaMA-13B": (5.09, 5.53, 5.36, 11.40, 6.63),
    "LLaMA-30B": (4.10, 4.54, 4.45, 14.89, 5.69),
    "LLaMA-65B": (3.53, 3.92, 3.84, 10.59, 5.04),
}

# intel/auto-round docs/paper_acc.md, the "Avg." column of tables 2 (W4G128) and 3 (W3G128).
# "SignRound" is the table's "Ours"; "GPTQ*" (re-seeded runs) is listed as GPTQ.
AUTOROUND_ACC = {  # model: {"FP16": avg, method: (W4G128 avg, W3G128 avg)}
    "Mistral-7B": {"FP16": 63.30, "RTN": (62.36, 58.20), "GPTQ": (62.32, 59.91), "AWQ": (62.16, 59.96),
                   "SignRound": (62.62, 60.43)},
    "Llama-2-7B": {"FP16": 57.98, "RTN": (56.92, 53.81), "GPTQ": (56.85, 54.14), "AWQ": (57.35, 55.21),
                   "SignRound": (57.57, 56.68)},
    "Llama-2-13B": {"FP16": 61.42, "RTN": (60.65, 58.57), "GPTQ": (61.00, 59.58), "AWQ": (60.91, 58.86),
                    "SignRound": (60.85, 59.44)},
    "Llama-2-70B": {"FP16": 66.12, "RTN": (65.87, 64.08), "GPTQ": (66.22, 65.08), "AWQ": (66.23, 65.12),
                    "SignRound": (66.39, 65.31)},
    "LLaMA-7B": {"FP16": 57.01, "RTN": (56.42, 53.25), "GPTQ": (55.78, 53.38), "AWQ": (56.07, 54.96),
                 "SignRound": (56.84, 54.54)},
    "LLaMA-13B": {"FP16": 60.33, "RTN": (59.34, 56.57), "GPTQ": (59.58, 57.14), "AWQ": (59.84, 58.37),
                  "SignRound": (60.07, 58.93)},
    "LLaMA-30B": {"FP16": 63.65, "RTN": (62.96, 61.52), "GPTQ": (62.92, 61.57), "AWQ": (63.35, 62.44),
                  "SignRound": (63.20, 62.51)},
    "LLaMA-65B": {"FP16": 65.15, "RTN": (65.26, 63.82), "GPTQ": (64.91, 64.32), "AWQ": (65.15, 64.45),
                  "SignRound": (65.08, 64.59)},
}
METHODS = ("GPTQ", "AWQ", "SignRound")


def ppl_share(fp: float, rtn: float, method: float) -> float:
    """Share of RTN's log-perplexity gap to full precision that ``method`` removes."""
    return (math.log(rtn) - math.log(method)) / (math.log(rtn) - math.log(fp))


def acc_share(fp: float, rtn: float, method: float) -> float | None:
    """Share of RTN's accuracy gap to full precision that ``method`` recovers; None without a gap."""
    return (method - rtn) / (fp - rtn) if fp > rtn else None


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def lines() -> list[str]:
    out = [
        MARK_BEGIN,
        "### What GPTQ closes in published measurements",
        "",
        "Reproduce: `python3 bench/published_gptq.py` (arithmetic on published figures, which the "
        "script lists with their sources; no model runs). \"Gap closed\" is defined as in the paired table: "
        "the share of round-to-nearest's gap to full precision that the method removes. Every evaluation "
        "here uses other data than the calibration set.",
        "",
        "The GPTQ authors' own LLaMA results (IST-DASLab/gptq README; WikiText-2 perplexity, calibrated "
        "on C4, act-order, per-channel):",
        "",
        "| model | FP16 | 4-bit RTN → GPTQ | gap closed | 3-bit RTN → GPTQ | gap closed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for model, (fp, r4, g4, r3, g3) in GPTQ_README.items():
        out.append(f"| {model} | {fp:.2f} | {r4:.2f} → {g4:.2f} | {_pct(ppl_share(fp, r4, g4))} "
                   f"| {r3:.2f} → {g3:.2f} | {_pct(ppl_share(fp, r3, g3))} |")
    out += [
        "",
        "auto-round's comparison (intel/auto-round docs/paper_acc.md; mean zero-shot accuracy over 11 tasks, "
        "calibrated on pile-10k; GPTQ with act-order and static groups, as lowbit runs it):",
        "",
        "| model | W4G128 FP16 / RTN | " + " | ".join(f"W4G128 {m}" for m in METHODS)
        + " | W3G128 RTN | " + " | ".join(f"W3G128 {m}" for m in METHODS) + " |",
        "|---|---:|" + "---:|" * (2 * len(METHODS) + 1),
    ]
    shares = {(m, b): [] for m in METHODS for b in (0, 1)}
    for model, acc in AUTOROUND_ACC.items():
        cells = [f"{acc['FP16']:.2f} / {acc['RTN'][0]:.2f}"]
        for b in (0, 1):
            if b == 1:
                cells.append(f"{acc['RTN'][1]:.2f}")
            for m in METHODS:
                s = acc_share(acc["FP16"], acc["RTN"][b], acc[m][b])
                if s is not None:
                    shares[(m, b)].append(s)
                cells.append(f"{acc[m][b]:.2f} ({_pct(s)})")
        out.append(f"| {model} | " + " | ".join(cells) + " |")
    medians = [" | ".join(_pct(statistics.median(shares[(m, b)])) for m in METHODS) for b in (0, 1)]
    out += [f"| median share | | {medians[0]} |  | {medians[1]} |", "", MARK_END]
    return out


def main() -> None:
    text = "\n".join(lines())
    print(text)
    write_section(HERE.parent / "BENCHMARKS.md", MARK_BEGIN, MARK_END, text.splitlines())


if __name__ == "__main__":
    main()
