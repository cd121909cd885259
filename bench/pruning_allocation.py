"""Per-layer sparsity allocations on sklearn digits: the checks of papers §15, §16, §17 on more seeds.

    OMP_NUM_THREADS=1 PYTHONPATH=src python3 bench/pruning_allocation.py [--seeds 3] [--out FILE.md]

Prints markdown tables (mean over seeds, and per seed) and a verdict per claim; exit status 1 when
a claim fails. Not part of the test suite (tests/pruning/test_alloc_papers.py runs seed 0 only).
Takes about 6 minutes on one busy CPU core. Experiments: ``lowbit.pruning.alloc_checks``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from lowbit.pruning import alloc_checks as C
from lowbit.pruning import rd_curves as R
from lowbit.pruning.small import load, prunable


def mean(xs) -> float:
    return statistics.fmean(xs)


def section16(d, seeds, lines, verdicts):
    rows, coll = [], {}
    for s in seeds:
        model = C.trained_mlp(d, (64, 512, 512, 10), seed=s)
        rows.append(C.global_vs_uniform(model, d, 0.9, 10, s))
        n = sum(w.numel() for w in prunable(model).values())
        mts = {"n_out": [w.shape[0] for w in prunable(model).values()], "0.1%·N": round(0.001 * n)}
        for (label, mk), ft in [(m, ft) for m in mts.items() for ft in (10, 30)]:
            coll.setdefault((label, ft), []).append(C.collapse(model, d, mk, 0.995, ft, s))
    lines += ["## §16a global vs uniform magnitude, 64-512-512-10, 90% sparsity, 10 fine-tuning epochs", "",
              "| seed | dense | global | uniform |", "|---|---|---|---|"]
    lines += [f"| {s} | {r['dense']:.4f} | {r['global']:.4f} | {r['uniform']:.4f} |" for s, r in zip(seeds, rows)]
    g, u = mean(r["global"] for r in rows), mean(r["uniform"] for r in rows)
    lines += [f"| mean | {mean(r['dense'] for r in rows):.4f} | {g:.4f} | {u:.4f} |", ""]
    verdicts.append(("§16a mean global >= mean uniform", g >= u))
    lines += ["## §16b 99.5% sparsity: global without / with a Minimum Threshold (MT), then fine-tuning", "",
              "| MT | epochs | seed | global keeps | global acc | MT keeps | MT acc | MT sparsity |",
              "|---|---|---|---|---|---|---|---|"]
    for (label, ft), rs in coll.items():
        for s, r in zip(seeds, rs):
            g, m = r["global"], r["global+MT"]
            lines.append(f"| {label} | {ft} | {s} | {g['keeps']} | {g['accuracy']:.3f} | {m['keeps']} | "
                         f"{m['accuracy']:.3f} | {m['sparsity']:.5f} |")
    lines.append("")
    main = coll[("0.1%·N", 10)]
    verdicts.append(("§16b global collapses (acc < 0.2, a layer feeds < half its outputs)",
                     all(r["global"]["accuracy"] < 0.2 and min(k / o for k, o in zip(r["global"]["keeps"],
                                                                                  r["global"]["n_out"])) < 0.5
                         for r in main)))
    verdicts.append(("§16b MT 0.1%·N, 10 epochs: acc >= 0.3 and >= global + 0.2 (every seed)",
                     all(r["global+MT"]["accuracy"] >= max(0.3, r["global"]["accuracy"] + 0.2) for r in main)))
    n_out_ok = all(r["global+MT"]["accuracy"] >= r["global"]["accuracy"] + 0.2 for r in coll[("n_out", 10)])
    lines += [f"Finding, not a gate: MT = n_out per layer, 10 epochs, acc >= global + 0.2 on every seed: "
              f"{'yes' if n_out_ok else 'no'} (the 10-weight output layer leaves about one input per class).", ""]


def section17(d, seeds, lines, verdicts):
    lines += ["## §17 random fixed masks at 90% sparsity, MLP 64-w-w-10 trained from scratch (30 epochs)", "",
              "| width | dense | ERK | uniform | gap to dense (best sparse) | per seed dense/ERK/uniform |",
              "|---|---|---|---|---|---|"]
    gaps, erk32 = {}, None
    for w in (32, 128, 512):
        rs = [C.random_sparse(d, w, 0.9, 30, s) for s in seeds]
        m = {k: mean(r[k] for r in rs) for k in ("dense", "erk", "uniform")}
        gaps[w] = m["dense"] - max(m["erk"], m["uniform"])
        erk32 = m if w == 32 else erk32
        per = "; ".join(f"{r['dense']:.3f}/{r['erk']:.3f}/{r['uniform']:.3f}" for r in rs)
        lines.append(f"| {w} | {m['dense']:.4f} | {m['erk']:.4f} | {m['uniform']:.4f} | "
                     f"{100 * gaps[w]:.2f} pt | {per} |")
    lines.append("")
    verdicts.append(("§17 gap to dense shrinks with width", gaps[32] > gaps[128] > gaps[512]))
    verdicts.append(("§17 ERK >= uniform at width 32 (mean)", erk32["erk"] >= erk32["uniform"]))
    verdicts.append(("§17 gap < 1 point at width 512 (mean)", gaps[512] < 0.01))


def section15(d, seeds, lines, verdicts):
    res, adds, brutes = {0.8: [], 0.9: []}, [], []
    for s in seeds:
        model = C.trained_mlp(d, (64, 256, 128, 10), seed=s)
        curves = R.layer_curves(model, d.train.x[:512], 100)
        for sp in res:
            res[sp].append(C.rd_compare(model, d, sp, curves=curves))
        adds.append(C.additivity(model, d.train.x[:512], curves, 40, 0.6, s))
        brutes.append(C.dp_vs_brute(model, d.train.x[:512], 0.85, 10))
    lines += ["## §15 allocations of a trained 64-256-128-10 MLP, one-shot magnitude pruning, no fine-tuning", "",
              "Output distortion mean ||Y − Ŷ||² of the logits on the test inputs; curves from 512 training "
              "inputs, 101 amounts. Mean over seeds.", "",
              "| sparsity | allocation | output MSE | accuracy | achieved sparsity |", "|---|---|---|---|---|"]
    for sp, rs in res.items():
        for m in C.ALLOCATIONS:
            lines.append(f"| {sp} | {m} | {mean(r[m]['mse'] for r in rs):.2f} | "
                         f"{mean(r[m]['accuracy'] for r in rs):.4f} | {mean(r[m]['sparsity'] for r in rs):.5f} |")
        wins = {m: sum(r["dp"]["mse"] < r[m]["mse"] for r in rs) for m in C.ALLOCATIONS if m != "dp"}
        lines.append(f"| {sp} | DP lower MSE than (seeds won of {len(rs)}) | {wins} | | |")
        for m in ("uniform", "erk"):
            verdicts.append((f"§15b {sp}: DP mean MSE < {m}", mean(r["dp"]["mse"] for r in rs) <
                             mean(r[m]["mse"] for r in rs)))
    lines += ["", f"§15a additivity corr(δ_joint, δ_i + δ_j), 40 pairs, amounts ≤ 0.6: "
              f"{', '.join(f'{a:.4f}' for a in adds)}", "",
              "§15c 3-layer net, 10% grid, 85% sparsity (additive objective DP / brute; true joint δ DP / best):", ""]
    lines += [f"- seed {s}: {b['dp_additive']:.4f} / {b['brute_additive']:.4f}; {b['dp_true']:.4f} / "
              f"{b['brute_true']:.4f}" for s, b in zip(seeds, brutes)]
    lines.append("")
    verdicts.append(("§15a corr > 0.9 (every seed)", all(a > 0.9 for a in adds)))
    verdicts.append(("§15c DP == brute force on the additive objective",
                     all(abs(b["dp_additive"] - b["brute_additive"]) <= 1e-9 * max(1, b["brute_additive"])
                         for b in brutes)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    d, seeds, t0 = load("digits"), list(range(args.seeds)), time.time()
    lines = ["`OMP_NUM_THREADS=1 PYTHONPATH=src python3 bench/pruning_allocation.py --seeds "
             f"{args.seeds}` (torch {torch.__version__})", ""]
    verdicts: list[tuple[str, bool]] = []
    for section in (section16, section17, section15):
        section(d, seeds, lines, verdicts)
    lines += ["## Verdicts", "", "| claim | holds |", "|---|---|"]
    lines += [f"| {c} | {'yes' if ok else '**NO**'} |" for c, ok in verdicts]
    lines += ["", f"wall time {time.time() - t0:.0f} s"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
