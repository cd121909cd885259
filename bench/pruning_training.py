"""Pruning-during-training papers' checks on small models, several seeds (METHODS.md §13, §14, §18).

    OMP_NUM_THREADS=1 python3 bench/pruning_training.py [--seeds 0 1 2] [--only lottery jackpot ftwt]

Prints a markdown table per paper (the reproducing command and the time taken at the top) and a
pass/fail line per claim; a claim passes when it holds for every seed. Exit status 1 when one fails.

* Lottery Ticket (§13): digits LeNet-300-100, IMP 14 rounds (20% per round, output layer 10%),
  30 Adam epochs per round, rewound to init; controls at ~4.8%: re-init with the same mask, a random
  mask from the ticket's rewind point; plus rewinding to step 50 (late resetting) at ~4.8%.
* Lottery Jackpots (§14): a 64-1024-256-10 digits MLP (90% uniform) and ccexam's pretrained MNIST
  CNN (90% global, searched on the MNIST-5k train split, scored on its test split); magnitude-init
  against random-init scores after 5, 10, 15, 20 and 40 search epochs (MLP) and 3 epochs (CNN);
  the paper's ">= 3x cheaper search" is checked as "5 magnitude-init epochs >= 15 random-init ones".
* Fire Together Wire Together (§18): small.cnn((32, 64, 64)) on digits, mthresh 0.9 and 0.95,
  10 predictor epochs, decoupled, mass targets.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from lowbit.pruning import fire_together as ft
from lowbit.pruning import jackpot, lottery, small

Claims = list[tuple[str, bool]]


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def bench_lottery(seeds: list[int]) -> tuple[list[str], Claims]:
    data = small.load("digits")
    make = lambda s: small.mlp([64, 300, 100, 10], s)  # noqa: E731
    cfg = lottery.LotteryConfig(rounds=14, train=lottery.TrainRecipe(epochs=30))
    late = lottery.LotteryConfig(rounds=14, rewind_step=50, train=cfg.train)
    rows = ["| seed | dense | ticket 11.2% | ticket 4.8% | re-init 4.8% | random mask 4.8% | rewind to step 50, 4.8% |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    near, gap = [], []
    for s in seeds:
        t = lottery.imp(make, data, cfg, seed=s, progress=False)
        r14 = t.rounds[14]
        reinit = lottery.retrain(make, data, r14.masks, cfg.train, init_seed=1000 + s, seed=s)
        rnd = lottery.retrain(make, data, lottery.random_masks(r14.masks, s), cfg.train, init=t.rewind, seed=s)
        k = lottery.imp(make, data, late, seed=s, progress=False).rounds[14].accuracy
        rows.append(f"| {s} | {_pct(t.rounds[0].accuracy)} | {_pct(t.rounds[10].accuracy)} | {_pct(r14.accuracy)} | "
                    f"{_pct(reinit)} | {_pct(rnd)} | {_pct(k)} |")
        near.append(t.rounds[0].accuracy - t.rounds[10].accuracy)
        gap.append(r14.accuracy - reinit)
    rows.append(f"| mean | dense − ticket 11.2%: {_pct(sum(near) / len(near))} | | ticket − re-init 4.8%: "
                f"{_pct(sum(gap) / len(gap))} | | | |")
    return rows, [("§13 ticket at ~11% within 1 point of dense, every seed", all(d <= 0.01 for d in near)),
                  ("§13 re-init >= 2 points below the ticket at ~5%, every seed", all(d >= 0.02 for d in gap)),
                  ("§13 re-init >= 2 points below the ticket at ~5%, mean of the seeds",
                   sum(gap) / len(gap) >= 0.02)]


def _epochs_to_within(model, data, init: str, cfg: jackpot.JackpotConfig, dense: float, seed: int,
                      epochs: list[int]) -> tuple[dict[int, float], int | None]:
    acc = {}
    for e in epochs:
        c = jackpot.JackpotConfig(**{**cfg.__dict__, "init": init, "epochs": e})
        acc[e] = jackpot.masked_accuracy(model, jackpot.search(model, data.train, c, seed=seed, progress=False).masks,
                                         data.test)
    first = next((e for e in epochs if dense - acc[e] <= 0.01), None)
    return acc, first


def _one_shot(model, cfg: jackpot.JackpotConfig, allocation: str, data) -> float:
    w = {n: p.detach() for n, p in small.prunable(model).items()}
    w.pop(list(w)[-1])
    return jackpot.masked_accuracy(model, jackpot.magnitude_masks(w, cfg.sparsity, allocation), data.test)


def bench_jackpot(seeds: list[int]) -> tuple[list[str], Claims]:
    epochs = [5, 10, 15, 20, 40]
    data = small.load("digits")
    cfg = jackpot.JackpotConfig(sparsity=0.9, allocation="uniform", batch_size=64)
    rows = ["| model | seed | dense | one-shot 90% | jackpot (magnitude init) by search epochs | random init | "
            "epochs to within 1 pt: magnitude / random |", "|---|---:|---:|---:|---|---|---|"]
    drop, near, faster, cost3x = [], [], [], []
    for s in seeds:
        model = small.mlp([64, 1024, 256, 10], seed=s)
        small.train(model, data.train, epochs=20, seed=s)
        dense = small.accuracy(model, data.test)
        shot = _one_shot(model, cfg, "uniform", data)
        mag, e_mag = _epochs_to_within(model, data, "magnitude", cfg, dense, s, epochs)
        rnd, e_rnd = _epochs_to_within(model, data, "random", cfg, dense, s, epochs)
        show = lambda a: ", ".join(f"{e}: {_pct(v)}" for e, v in a.items())  # noqa: E731
        rows.append(f"| digits MLP 64-1024-256-10, uniform | {s} | {_pct(dense)} | {_pct(shot)} | {show(mag)} | "
                    f"{show(rnd)} | {e_mag} / {e_rnd} |")
        drop.append(dense - shot >= 0.05)
        near.append(dense - mag[20] <= 0.01)
        faster.append(mag[5] > rnd[5] and mag[10] > rnd[10])
        cost3x.append(mag[5] >= rnd[15])
    mnist = small.load("mnist5k", images=True)
    cnn = small.pretrained_mnist_cnn()
    dense = small.accuracy(cnn, mnist.test)
    ccfg = jackpot.JackpotConfig(sparsity=0.9, allocation="global", epochs=3)
    shot, shot_u = _one_shot(cnn, ccfg, "global", mnist), _one_shot(cnn, ccfg, "uniform", mnist)
    cnn_drop, cnn_near = dense - shot >= 0.05, []
    for s in seeds:
        mag = jackpot.masked_accuracy(cnn, jackpot.search(cnn, mnist.train, ccfg, seed=s, progress=False).masks,
                                      mnist.test)
        rnd = "—"
        if s == seeds[0]:
            rc = jackpot.JackpotConfig(**{**ccfg.__dict__, "init": "random"})
            rnd = _pct(jackpot.masked_accuracy(cnn, jackpot.search(cnn, mnist.train, rc, seed=s, progress=False).masks,
                                               mnist.test))
        rows.append(f"| ccexam MNIST CNN, global (uniform one-shot: {_pct(shot_u)}) | {s} | {_pct(dense)} | "
                    f"{_pct(shot)} | 3: {_pct(mag)} | 3: {rnd} | |")
        cnn_near.append(dense - mag <= 0.01)
    return rows, [("§14 MLP: one-shot 90% loses >= 5 points", all(drop)),
                  ("§14 MLP: jackpot (20 epochs) within 1 point of dense", all(near)),
                  ("§14 MLP: magnitude init ahead of random init after 5 and after 10 epochs", all(faster)),
                  ("§14 MLP: >= 3x cheaper: magnitude init after 5 epochs >= random init after 15", all(cost3x)),
                  ("§14 CNN: one-shot 90% (global) loses >= 5 points", cnn_drop),
                  ("§14 CNN: jackpot (3 epochs) within 1 point of dense", all(cnn_near))]


def bench_ftwt(seeds: list[int]) -> tuple[list[str], Claims]:
    data = small.load("digits", images=True)
    rows = ["| seed | mthresh | dense | gated | mask accuracy | conv FLOPs cut | active channels (mean ± std) | "
            "kept by targets, train / by masks, train |", "|---:|---:|---:|---:|---:|---:|---|---|"]
    ok_mask, ok_acc, ok_cut, ok_std = [], [], {0.9: [], 0.95: []}, []
    for s in seeds:
        model = small.cnn((32, 64, 64), seed=s)
        small.train(model, data.train, epochs=20, seed=s)
        dense = small.accuracy(model, data.test)
        for mthresh in (0.9, 0.95):
            cfg = ft.FTWTConfig(mthresh=mthresh)
            gated = ft.Gated(copy.deepcopy(model), cfg, image_side=8)
            ft.train_predictors(gated, data.train, cfg, seed=s, progress=False)
            r, tr = ft.evaluate(gated, data.test), ft.evaluate(gated, data.train)
            masks_density = tr.active_mean / sum(b.conv.out_channels for b in gated.layers if isinstance(b, ft.GatedBlock))
            rows.append(f"| {s} | {mthresh} | {_pct(dense)} | {_pct(r.accuracy)} | {_pct(r.mask_accuracy)} | "
                        f"{_pct(r.flops_cut)}% | {r.active_mean:.1f} ± {r.active_std:.1f} | "
                        f"{_pct(tr.target_density)}% / {_pct(masks_density)}% |")
            ok_mask.append(r.mask_accuracy > 0.9)
            ok_acc.append(dense - r.accuracy <= 0.015)
            ok_cut[mthresh].append(r.flops_cut >= 0.3)
            ok_std.append(r.active_std > 0)
    return rows, [("§18 mask-prediction accuracy > 90%", all(ok_mask)),
                  ("§18 gated accuracy within 1.5 points of dense", all(ok_acc)),
                  ("§18 >= 30% conv FLOPs cut at mthresh 0.9", all(ok_cut[0.9])),
                  ("§18 >= 30% conv FLOPs cut at mthresh 0.95", all(ok_cut[0.95])),
                  ("§18 active channels vary across inputs (std > 0)", all(ok_std))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="+", default=["lottery", "jackpot", "ftwt"],
                    choices=["lottery", "jackpot", "ftwt"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    cmd = "OMP_NUM_THREADS=1 python3 bench/pruning_training.py " + " ".join(sys.argv[1:])
    out, failed = [f"Reproduce: `{cmd.strip()}`", ""], False
    parts = {"lottery": ("Lottery Ticket (§13)", bench_lottery), "jackpot": ("Lottery Jackpots (§14)", bench_jackpot),
             "ftwt": ("Fire Together Wire Together (§18)", bench_ftwt)}
    for key in args.only:
        title, run = parts[key]
        t0 = time.perf_counter()
        rows, claims = run(args.seeds)
        out += [f"### {title}: {time.perf_counter() - t0:.0f} s, seeds {args.seeds}", "", *rows, ""]
        out += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in claims] + [""]
        failed |= not all(ok for _, ok in claims)
    print("\n".join(out))
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
