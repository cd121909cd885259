"""Which scale rule for the full-range symmetric integer grid? Weight error and perplexity on SmolLM2.

    python3 bench/int_grid.py [--windows 16] [--seq-len 512] [--only int4:g64,int3:g128,int2:g64]

Every rule is written out here from its definition (independent of ``lowbit.formats.int``), with
``N = 2^(b-1)`` and ``x̂ = s·q``; the scale is rounded to float16 (lowbit's default storage) before
rounding the weights:

=========  =====================================================  ===============================
rule       scale per block                                        codes ``q``
=========  =====================================================  ===============================
narrow     ``absmax/(N-1)`` (lowbit before this change)            ``[-(N-1), N-1]`` (2^b - 1 codes)
half       ``absmax/N``; the positive end clips at ``(N-1)·s``     ``[-N, N-1]``
gptq       ``2·absmax/(2N-1)`` (GPTQ, compressed-tensors)          ``[-N, N-1]``
cover      ``max(max/(N-1), -min/N)``: the smallest scale that     ``[-N, N-1]``
           clips nothing
best3      per block the one of half, gptq, cover with the         ``[-N, N-1]``
           smallest squared error
signed     ``m/(-N)`` with ``m`` the block's weight of largest       ``[-N, N-1]``
           magnitude, sign kept: ``m`` lands exactly on code
           ``-N`` (a negative scale when ``m > 0``); GGUF Q4_0's
           and auto-round's symmetric rule (lowbit has no format
           with signed scales yet)
=========  =====================================================  ===============================

``--fz-anchor`` instead measures the clip search of float-zero formats (``uint4_fz:g64:mse``,
``uint3_fz:g128:mse``; weight error only): each ratio ``c`` of ``MSE_RATIOS`` shrinks a block's
range ``[lo, hi]`` around an anchor ``a``, ``[a + c·(lo − a), a + c·(hi − a)]``, with ``a`` = 0
(the old rule, which shifts a one-sided block), the point of ``[lo, hi]`` nearest 0, or the midpoint.

Weight error: ``sqrt(Σ‖W − Ŵ‖² / Σ‖W‖²)`` over the 210 decoder linears. Perplexity: the first
``--windows`` windows of ``--seq-len`` tokens of the pydoc evaluation half. Results go to
bench/out/int_grid.json (``--no-ppl``: int_grid_weights.json; finished cells are kept) and
are printed as a table.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch

from lowbit.eval import eval_text, token_windows
from lowbit.eval.perplexity import next_token_logprobs, token_nll
from lowbit.hf.load import load_model

OUT = Path(__file__).resolve().parent / "out" / "int_grid.json"
RULES = ("narrow", "half", "gptq", "cover", "best3", "signed")


def fake_quant(blocks: torch.Tensor, bits: int, rule: str) -> torch.Tensor:
    """(n_blocks, g) float32 -> the rule's reconstruction, same shape."""
    n = 2 ** (bits - 1)
    if rule == "best3":
        cands = torch.stack([fake_quant(blocks, bits, r) for r in ("half", "gptq", "cover")])  # (3, n_blocks, g)
        err = (cands - blocks).pow(2).sum(-1, keepdim=True)  # (3, n_blocks, 1)
        return cands.gather(0, err.argmin(0, keepdim=True).expand(1, *blocks.shape))[0]
    amax = blocks.abs().amax(1, keepdim=True)
    lo = -(n - 1) if rule == "narrow" else -n
    if rule == "narrow":
        s = amax / (n - 1)
    elif rule == "half":
        s = amax / n
    elif rule == "gptq":
        s = 2 * amax / (2 * n - 1)
    elif rule == "cover":
        s = torch.maximum(blocks.amax(1, keepdim=True).clamp(min=0) / (n - 1), -blocks.amin(1, keepdim=True) / n)
    elif rule == "signed":
        s = blocks.gather(1, blocks.abs().argmax(1, keepdim=True)) / -n
    else:
        raise ValueError(rule)
    s = s.to(torch.float16).to(torch.float32)
    s = torch.where(s != 0, s, torch.ones_like(s))
    return (blocks / s).round().clamp(lo, n - 1) * s


def fz_search(blocks: torch.Tensor, bits: int, anchor: str) -> torch.Tensor:
    """Float-zero ``x̂ = s·q + m`` with the per-block best of 21 clip ratios (1.00 .. 0.80), fp16 storage."""
    qmax = 2**bits - 1
    lo, hi = blocks.amin(1, keepdim=True), blocks.amax(1, keepdim=True)
    a = {"zero": torch.zeros_like(lo), "nearest": torch.zeros_like(lo).clamp(lo, hi), "mid": (lo + hi) / 2}[anchor]
    best, best_err = None, None
    for c in (round(1.0 - 0.01 * i, 2) for i in range(21)):
        lo_c, hi_c = a + c * (lo - a), a + c * (hi - a)
        s = ((hi_c - lo_c) / qmax).to(torch.float16).float()
        m = lo_c.to(torch.float16).float()
        s_safe = torch.where(s > 0, s, torch.ones_like(s))
        xhat = ((blocks - m) / s_safe).round().clamp(0, qmax) * s + m
        err = (xhat - blocks).pow(2).sum(1, keepdim=True)
        if best is None:
            best, best_err = xhat, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, xhat, best), torch.where(better, err, best_err)
    return best


def fz_anchor_table(model: torch.nn.Module) -> None:
    """Print the relative weight error of the float-zero clip search for each anchor."""
    print("| config | anchor | rel. weight error | one-sided blocks |\n|---|---|---|---|")
    for bits, group in ((4, 64), (3, 128)):
        for anchor in ("zero", "nearest", "mid"):
            num = den = 0.0
            one_sided = n_blocks = 0
            for name, mod in model.named_modules():
                if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}":
                    w = mod.weight.detach().float()
                    for start in range(0, w.shape[1], group):  # groups along each row, as lowbit's
                        blocks = w[:, start:start + group]  # (rows, g); the last group may be shorter
                        num += float((fz_search(blocks, bits, anchor) - blocks).double().pow(2).sum())
                        den += float(blocks.double().pow(2).sum())
                        one_sided += int(((blocks.amin(1) > 0) | (blocks.amax(1) < 0)).sum())
                        n_blocks += blocks.shape[0]
            print(f"| uint{bits}_fz:g{group}:mse | {anchor} | {math.sqrt(num / den):.5f} | {one_sided}/{n_blocks} |",
                  flush=True)


def quantize_model(model: torch.nn.Module, bits: int, group: int, rule: str) -> tuple[float, float]:
    """Replace every decoder linear weight by its reconstruction; -> (Σ‖ΔW‖², Σ‖W‖²)."""
    num = den = 0.0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}":
                w = mod.weight.float()
                wq = torch.empty_like(w)
                for start in range(0, w.shape[1], group):  # groups along each row; the last may be shorter
                    part = w[:, start:start + group]  # (rows, g)
                    wq[:, start:start + group] = fake_quant(part, bits, rule)
                num += float((wq - w).double().pow(2).sum())
                den += float(w.double().pow(2).sum())
                mod.weight.copy_(wq.to(mod.weight.dtype))
    return num, den


@torch.inference_mode()
def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    model.eval()
    nll, n = 0.0, 0
    for w in windows:
        t = token_nll(next_token_logprobs(model, w[None]), w[None])
        nll += float(t.double().sum())
        n += t.numel()
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--only", default="int4:g64,int3:g128,int2:g64")
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--fz-anchor", action="store_true", help="measure the float-zero clip search instead")
    ap.add_argument("--no-ppl", action="store_true", help="weight error only (cells keyed 'w0')")
    args = ap.parse_args()
    loaded = load_model("smollm2-135m", dtype=torch.float32)
    if args.fz_anchor:
        return fz_anchor_table(loaded.model)
    windows = token_windows(loaded.tokenizer, eval_text(None), args.seq_len, args.windows)
    out = OUT.with_name("int_grid_weights.json") if args.no_ppl else OUT
    done = json.loads(out.read_text()) if out.exists() else {}
    key = "w0" if args.no_ppl else f"w{args.windows}x{args.seq_len}"
    if f"fp32 {key}" not in done:
        done[f"fp32 {key}"] = {"ppl": float("nan") if args.no_ppl else perplexity(loaded.model, windows),
                               "rel_err": 0.0}
    for cfg in args.only.split(","):
        bits, group = int(cfg[3]), int(cfg.split(":g")[1])
        for rule in args.rules.split(","):
            cell = f"{cfg} {rule} {key}"
            if cell in done:
                continue
            model = copy.deepcopy(loaded.model)
            num, den = quantize_model(model, bits, group, rule)
            ppl = float("nan") if args.no_ppl else perplexity(model, windows)
            done[cell] = {"ppl": ppl, "rel_err": math.sqrt(num / den)}
            print(cell, done[cell], flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(done, indent=1, sort_keys=True) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(done, indent=1, sort_keys=True) + "\n")
    print(f"| cell | rel. weight error | pydoc ppl ({key}) |\n|---|---|---|")
    for cell, r in done.items():
        if cell.endswith(key):
            print(f"| {cell.rsplit(' ', 1)[0]} | {r['rel_err']:.4f} | {r['ppl']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
