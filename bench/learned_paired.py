"""Learned rounding against round-to-nearest and GPTQ: paired comparisons with intervals, time and memory.

    python3 bench/learned_paired.py [--scheme uint4:g128] [--cells rtn,gptq,signround,...]
                                    [--samples 32] [--batch 2] [--windows 64] [--calib pydoc]

``--calib`` is ``lowbit quantize``'s (a source or a mix such as ``pydoc:0.5,self:0.5``), where the
name ``prose`` stands for the calibration half of the prose corpus (``corpora.prose_split``; no
prose evaluation window contains it). A calibration with prose makes the prose column in domain.

Each cell is ``LABEL=METHOD[:k=v,...]`` or one of the names in ``CELLS`` (e.g. ``signround``,
``signround-gptq``, ``gptq``). Every cell is quantized in its own process on the same
``--samples`` calibration windows of 512 tokens (``--batch`` windows per step or forward),
timed and measured for peak memory (``bench/rss.py``) through ``lowbit quantize`` (whose
report gives the forecast peak beside the measured one), and saved under
``bench/out/learned/<scheme>-<calib>-<samples>x<batch>/<label>/``; a cell whose folder is there is
reused, and so are its scores (delete the folder to redo); the cells of an earlier run on the same
scheme, calibration and windows that a run does not name are kept in its results. A killed
cell's ``<label>.partial`` run is resumed (its seconds then cover the resumed part only); a cell
that fails is reported and left out, the others go on, and the run exits non-zero at the end.
Then fp32 and every cell are scored on the same ``--windows`` windows of pydoc and of
prose (not calibrated on: out of domain), and each cell is paired window by window against RTN:
``Δ log ppl`` with its 95% interval (1.96 standard errors over windows) and the share of RTN's gap to
fp32 it closes. Writes ``bench/out/learned-<scheme>.json`` and the section of BENCHMARKS.md between
the learned-paired markers (one table per scheme).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import read_section, write_section  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- learned-paired:begin -->", "<!-- learned-paired:end -->"
Z95 = 1.96
CELLS = {
    "rtn": "rtn",
    "gptq": "gptq",
    "signround": "signround",
    "signround-gptq": "signround:init=gptq",
    "lsq": "lsq",
}


def parse_cell(text: str) -> tuple[str, str, dict]:
    """``LABEL=METHOD[:k=v,...]`` or a name of ``CELLS`` -> (label, method, options)."""
    label, _, spec = text.partition("=")
    spec = spec or CELLS.get(label, label)
    method, _, opts = spec.partition(":")
    options = {}
    for item in filter(None, opts.split(",")):
        k, _, v = item.partition("=")
        options[k] = json.loads(v) if v[:1].isdigit() or v[:1] in "-[{" or v in ("true", "false") else v
    return label, method, options


def calib_arg(calib: str) -> str:
    """``--calib`` for ``lowbit quantize``: every ``prose`` source becomes the prose calibration half's file."""
    from corpora import cache_dir, prose_calibration_file

    def one(entry: str) -> str:
        name, sep, weight = entry.partition(":")
        if name != "prose":
            return entry
        return str(prose_calibration_file(cache_dir() / "prose-calibration-half.txt")) + sep + weight

    return ",".join(one(e) for e in calib.split(","))


def calib_tag(calib: str) -> str:
    """A file-name-safe tag of a calibration spec (``pydoc:0.5,prose:0.5`` -> ``pydoc0.5+prose0.5``)."""
    return "+".join(e.replace(":", "") for e in calib.split(","))


def command(cell: str, args: argparse.Namespace, folder: Path) -> list[str]:
    """The ``lowbit quantize`` command line of one cell (the user's path, with its report)."""
    _, method, options = parse_cell(cell)
    cmd = [sys.executable, "-m", "lowbit", "quantize", "smollm2-135m", "--scheme", args.scheme, "--method", method,
           "--out", str(folder), "--report", str(folder.parent / f"{folder.name}.report.json"), "--overwrite"]
    if method != "rtn":
        cmd += ["--samples", str(args.samples), "--seq-len", "512", "--batch-size", str(args.batch),
                "--calib", calib_arg(args.calib)]
        if folder.with_name(folder.name + ".partial").exists():  # a killed run of this cell: continue it
            cmd.append("--resume")
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        cmd += [flag if v is True else "--no-" + flag[2:]] if isinstance(v, bool) else [flag, str(v)]
    return cmd


def quantize_cells(args: argparse.Namespace, root: Path, failed: list[str]) -> dict[str, dict]:
    """Quantize (or reuse) every cell; the labels of cells whose run failed go to ``failed``."""
    from rss import measure

    out = {}
    root.mkdir(parents=True, exist_ok=True)
    for cell in args.cells.split(","):
        label, method, options = parse_cell(cell)
        folder = root / label
        meta = folder / "bench.json"
        if not meta.exists():
            cmd = command(cell, args, folder)
            r = measure(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if r["returncode"] != 0:  # reported, and the other cells go on
                print(f"cell {label} failed:\n{r['stderr_tail']}", file=sys.stderr, flush=True)
                failed.append(label)
                continue
            report = json.loads((folder.parent / f"{folder.name}.report.json").read_text())
            meta.write_text(json.dumps({"label": label, "method": method, "options": options,
                                        "resumed": "--resume" in cmd,  # its seconds cover the resumed part only
                                        "seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"],
                                        "quantize_seconds": report.get("quantize_seconds"),
                                        "forecast_bytes": report.get("forecast_bytes"),
                                        "peak_rss_bytes": report.get("peak_rss_bytes")}))
        out[label] = json.loads(meta.read_text())
        report = folder.parent / f"{folder.name}.report.json"
        if report.exists():  # the run's own figures: quantize seconds (no load or save), forecast, peak
            r = json.loads(report.read_text())
            out[label].update({k: r.get(k) for k in ("quantize_seconds", "forecast_bytes", "peak_rss_bytes",
                                                     "bits_per_weight")})
    return out


@torch.inference_mode()
def score_cells(cells: dict[str, dict], root: Path, windows: int) -> dict:
    import lowbit
    from corpora import prose_split
    from lowbit.eval import eval_text, token_windows
    from lowbit.eval.kl import token_kl
    from lowbit.eval.perplexity import next_token_logprobs, token_nll
    from lowbit.hf.load import load_model

    loaded = load_model("smollm2-135m")
    fp32, tok = loaded.model.eval(), loaded.tokenizer
    texts = {"pydoc": eval_text(None), "prose": prose_split()[1]}
    wins = {c: token_windows(tok, t, 512, windows) for c, t in texts.items()}
    refs = {c: [next_token_logprobs(fp32, w[None]) for w in ws] for c, ws in wins.items()}
    scores = {c: {"fp32": [float(token_nll(r, w[None]).double().sum()) for r, w in zip(refs[c], wins[c])]}
              for c in wins}
    kls = {c: {} for c in wins}
    for label in cells:
        cached = root / label / f"bench-scores-{windows}.json"  # a cell's scores on these windows, kept
        if cached.exists():
            saved = json.loads(cached.read_text())
            for c in wins:
                scores[c][label], kls[c][label] = saved[c]["nll"], saved[c]["kl"]
            continue
        model = lowbit.load(root / label, packed=False).eval()
        for c, ws in wins.items():
            nll, kl = [], 0.0
            for w, ref in zip(ws, refs[c]):
                logp = next_token_logprobs(model, w[None])
                nll.append(float(token_nll(logp, w[None]).double().sum()))
                kl += float(token_kl(logp, ref).double().sum())
            scores[c][label] = nll
            kls[c][label] = kl / (ws.shape[0] * (ws.shape[1] - 1))
        cached.write_text(json.dumps({c: {"nll": scores[c][label], "kl": kls[c][label]} for c in wins}))
        del model
    return {c: summarize(scores[c], kls[c], wins[c].shape[0] * (wins[c].shape[1] - 1)) for c in wins}


def summarize(nll: dict[str, list[float]], kl: dict[str, float], tokens: int) -> dict:
    """Perplexity, KL and the paired difference against RTN of every model."""
    logppl = {k: sum(v) / tokens for k, v in nll.items()}
    gap = logppl["rtn"] - logppl["fp32"]
    out = {"tokens": tokens, "windows": len(nll["fp32"]), "models": {}}
    for k in nll:
        d = torch.tensor(nll[k], dtype=torch.float64) - torch.tensor(nll["rtn"], dtype=torch.float64)
        diff, se = float(d.sum()) / tokens, math.sqrt(len(d)) * float(d.std()) / tokens
        out["models"][k] = {"ppl": math.exp(logppl[k]), "ratio": math.exp(logppl[k] - logppl["fp32"]),
                            "kl": kl.get(k, 0.0), "minus_rtn": diff, "se": se,
                            "gap_closed": -diff / gap if gap > 0 else float("nan")}
    return out


def merge_earlier(result: dict, path: Path) -> None:
    """Keep the cells of an earlier run of the same scheme, calibration and windows that this run
    did not name: their figures are paired against the same RTN on the same windows."""
    if not path.exists():
        return
    old = json.loads(path.read_text())
    if old["pydoc"]["windows"] != result["pydoc"]["windows"] or old["pydoc"]["tokens"] != result["pydoc"]["tokens"]:
        return
    for label, cell in old["cells"].items():
        if label not in result["cells"]:
            result["cells"][label] = cell
            for c in ("pydoc", "prose"):
                result[c]["models"][label] = old[c]["models"][label]


def write_markdown(path: Path = HERE.parent / "BENCHMARKS.md") -> None:
    lines = [
        MARK_BEGIN,
        "### Learned rounding: paired comparisons against round-to-nearest",
        "",
        "Reproduce: `python3 bench/learned_paired.py --scheme SCHEME --cells CELLS --calib CALIB --samples N` "
        "(SmolLM2-135M; the cells of a table share its calibration windows, `prose` meaning the prose corpus's "
        "calibration half, which no evaluation window contains; each cell is its own `lowbit quantize` process; "
        "quantize s is the run without loading and saving, peak RSS the process tree's, forecast the run's own peak "
        "forecast; prose is out of domain unless the calibration has prose). Δ is the cell's log perplexity minus RTN's, paired window by window, "
        "± the 95% interval; \"gap closed\" is the share of RTN's log-perplexity gap to fp32 removed. "
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}.",
    ]
    for f in sorted((HERE / "out").glob("learned-*.json")):
        r = json.loads(f.read_text())
        domain = "prose in domain" if "prose" in r["calib"] else "prose out of domain"
        lines += ["", f"**{r['scheme']}**, calibration {r['calib']} {r['samples']}×512 ({domain}), batch {r['batch']}, "
                  f"{r['pydoc']['windows']} windows per corpus:", "",
                  "| cell | method | bits/weight | pydoc ppl (×fp32) | pydoc Δ vs RTN | pydoc gap closed "
                  "| prose ppl (×fp32) | prose Δ vs RTN | prose gap closed | prose KL | quantize s | peak RSS MiB "
                  "| forecast MiB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        fp = {c: r[c]["models"]["fp32"]["ppl"] for c in ("pydoc", "prose")}
        lines.append(f"| fp32 | – | 32 | {fp['pydoc']:.3f} | | | {fp['prose']:.3f} | | | | | | |")
        for label, cell in r["cells"].items():
            row = [label, _method(cell), f"{cell['bits_per_weight']:.3f}"]
            for c in ("pydoc", "prose"):
                m = r[c]["models"][label]
                row += [f"{m['ppl']:.3f} ({m['ratio']:.3f}×)", f"{m['minus_rtn']:+.4f} ± {Z95 * m['se']:.4f}",
                        f"{100 * m['gap_closed']:.0f}%"]
            forecast = cell.get("forecast_bytes")
            row += [f"{r['prose']['models'][label]['kl']:.4f}", f"{cell.get('quantize_seconds') or cell['seconds']:.0f}",
                    f"{cell['peak_rss_mb']:.0f}",
                    f"{forecast / 2**20:.0f}" if forecast else "–"]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", MARK_END]
    write_section(path, MARK_BEGIN, MARK_END, lines)


def _method(cell: dict) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in cell["options"].items())
    return cell["method"] + (f" ({opts})" if opts else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheme", default="uint4:g128")
    ap.add_argument("--cells", default="rtn,gptq,signround,signround-gptq")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--calib", default="pydoc")
    args = ap.parse_args()
    if "rtn" not in args.cells.split(","):
        args.cells = "rtn," + args.cells
    safe = "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in args.scheme)
    tag = calib_tag(args.calib)
    root = HERE / "out" / "learned" / f"{safe}-{tag}-{args.samples}x{args.batch}"
    failed: list[str] = []
    cells = quantize_cells(args, root, failed)
    result = {"scheme": args.scheme, "calib": args.calib, "samples": args.samples, "batch": args.batch,
              "cells": cells, **score_cells(cells, root, args.windows)}
    size = "" if (args.samples, args.batch) == (32, 2) else f"-{args.samples}x{args.batch}"
    out = HERE / "out" / f"learned-{safe}{'' if tag == 'pydoc' else '-' + tag}{size}.json"
    merge_earlier(result, out)
    out.write_text(json.dumps(result, indent=1))
    for c in ("pydoc", "prose"):
        print(c, {k: round(v["ratio"], 4) for k, v in result[c]["models"].items()})
    write_markdown()
    if failed:
        raise SystemExit(f"cells that failed (see above): {', '.join(failed)}")


if __name__ == "__main__":
    main()
