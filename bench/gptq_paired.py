"""Is GPTQ's gain over round-to-nearest real? A paired comparison on more windows, with error bars.

    python3 bench/gptq_paired.py [--scheme w4g128-asym] [--windows 64] [--samples 32]
                                 [--calib pydoc|prose|SPEC] [--damp 1.0]

``bench/gptq.py`` scores each cell on 16 windows per corpus, where a 1% perplexity difference
can be chance. This script quantizes one scheme twice in this process (round-to-nearest, and
GPTQ with act-order and ``--damp``, lowbit's default unless given, on ``--samples`` calibration
windows), then scores fp32, RTN
and GPTQ on the same ``--windows`` windows of each corpus, window by window: perplexity, KL
against fp32, and the paired difference of the two quantized models. With ``d_i`` the GPTQ
minus RTN negative log-likelihood of window ``i`` (summed over its tokens) and ``n`` the tokens,
the log-perplexity difference is ``Σd_i / n`` with standard error ``√W · std(d) / n``; the
95% interval is ±1.96 standard errors (windows are treated as independent, which adjacent
windows of one text only approximately are). The share of RTN's gap to fp32 that GPTQ closes
is ``(log ppl_RTN − log ppl_GPTQ) / (log ppl_RTN − log ppl_fp32)``, given with the same interval.

``--calib`` is pydoc's calibration half by default. ``--calib prose`` calibrates on the prose
corpus's calibration half (``corpora.prose_split()[0]``, disjoint from the prose evaluation
windows): in-domain calibration for the prose rows, an estimate of how much of the prose gap
GPTQ can close at all when it is given text of that domain. Any other value is a
``lowbit.calib`` spec (a file, a mix such as ``pydoc:0.5,self:0.5``).
Writes the section of BENCHMARKS.md between the gptq-paired markers and
``bench/out/gptq-paired-<scheme>.json`` (``<scheme>-<calib>-damp<d>`` when either is not the default).
Rows already in that section whose json is gone (``bench/out`` was cleared) are kept; a rerun of
the same scheme and calibration replaces its rows in place.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import read_section, write_section  # noqa: E402
from corpora import prose_calibration_file, prose_split  # noqa: E402

import lowbit  # noqa: E402
from lowbit.algorithms.gptq import DEFAULT_DAMP  # noqa: E402
from lowbit.calib import calibration_windows  # noqa: E402
from lowbit.eval import eval_text, token_windows  # noqa: E402
from lowbit.eval.kl import token_kl  # noqa: E402
from lowbit.eval.perplexity import next_token_logprobs, token_nll  # noqa: E402
from lowbit.hf.load import load_model  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- gptq-paired:begin -->", "<!-- gptq-paired:end -->"
Z95 = 1.96


@torch.inference_mode()
def per_window(models: dict, windows: torch.Tensor) -> dict:
    """{name: {"nll": [W floats], "kl": [W floats]}} for every model; KL against models["fp32"]."""
    out = {k: {"nll": [], "kl": []} for k in models}
    for w in windows:
        ref = next_token_logprobs(models["fp32"], w[None])  # (1, L-1, V)
        for k, m in models.items():
            logp = ref if k == "fp32" else next_token_logprobs(m, w[None])
            out[k]["nll"].append(float(token_nll(logp, w[None]).double().sum()))
            out[k]["kl"].append(float(token_kl(logp, ref).double().sum()))
    return out


def paired(a: list[float], b: list[float], tokens: int) -> tuple[float, float]:
    """Mean per-token difference of ``a − b`` (window sums) and its standard error."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    return float(d.sum()) / tokens, math.sqrt(len(d)) * float(d.std()) / tokens


def summarize(scores: dict, tokens: int) -> dict:
    logppl = {k: sum(v["nll"]) / tokens for k, v in scores.items()}
    diff, se = paired(scores["gptq"]["nll"], scores["rtn"]["nll"], tokens)
    gap = logppl["rtn"] - logppl["fp32"]
    return {"ppl": {k: math.exp(v) for k, v in logppl.items()},
            "kl": {k: sum(v["kl"]) / tokens for k, v in scores.items()},
            "gptq_minus_rtn_logppl": diff, "se": se,
            "gap_closed": -diff / gap if gap > 0 else float("nan"), "gap_closed_se": se / gap if gap > 0 else float("nan"),
            "tokens": tokens, "windows": len(scores["fp32"]["nll"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheme", default="w4g128-asym")
    ap.add_argument("--windows", type=int, default=64, help="evaluation windows per corpus")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--samples", type=int, default=32, help="GPTQ calibration windows")
    ap.add_argument("--calib", default="pydoc", help="pydoc, prose (its calibration half) or a lowbit.calib spec")
    ap.add_argument("--damp", type=float, default=DEFAULT_DAMP, help="GPTQ relative dampening")
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m")
    fp32, tok = loaded.model.eval(), loaded.tokenizer
    rtn = lowbit.quantize(copy.deepcopy(fp32), args.scheme)
    t0 = time.perf_counter()
    calib = calibration_windows(tok, calib_spec(args.calib), args.samples, args.seq_len, model=fp32)
    gptq = lowbit.quantize(copy.deepcopy(fp32), args.scheme, method="gptq", calib=calib, damp=args.damp)
    seconds = time.perf_counter() - t0
    models = {"fp32": fp32, "rtn": rtn, "gptq": gptq}
    result = {"scheme": args.scheme, "samples": args.samples, "seq_len": args.seq_len, "gptq_seconds": seconds,
              "calib": args.calib, "damp": args.damp}
    for corpus, text in (("pydoc", eval_text(None)), ("prose", prose_split()[1])):
        windows = token_windows(tok, text, args.seq_len, args.windows)
        result[corpus] = summarize(per_window(models, windows), windows.shape[0] * (windows.shape[1] - 1))
        print(corpus, json.dumps(result[corpus]), flush=True)
    label = args.scheme if (args.calib, args.damp) == ("pydoc", DEFAULT_DAMP) else \
        f"{args.scheme}-{Path(args.calib).name}-damp{args.damp:g}"
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in label)
    out = HERE / "out" / f"gptq-paired-{safe}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    # the default calibration's rows first, then the other calibrations of the same scheme
    write_markdown(sorted((HERE / "out").glob("gptq-paired-*.json"), key=lambda f: ("-damp" in f.stem, f.name)))


def calib_spec(calib: str) -> str:
    """A ``lowbit.calib`` spec for ``--calib``: ``prose`` becomes a file holding its calibration half."""
    if calib != "prose":
        return calib
    return str(prose_calibration_file(HERE / "out" / "prose-calibration-half.txt"))  # as bench/gptq.py


def _calibration(r: dict) -> str:
    calib = r.get("calib", "pydoc")
    calib = {"prose": "prose (in domain for prose)"}.get(calib, Path(calib).name)
    return f"{calib} {r['samples']}×{r['seq_len']}, damp {r.get('damp', DEFAULT_DAMP):g}"


def write_markdown(files: list[Path], path: Path = HERE.parent / "BENCHMARKS.md") -> None:
    lines = [
        MARK_BEGIN,
        "### Is the GPTQ gain real? Paired RTN-against-GPTQ comparisons on more windows",
        "",
        "Reproduce: `python3 bench/gptq_paired.py --scheme SCHEME --windows W [--calib C --damp D]` "
        "(one run per pair of rows). RTN and GPTQ (act-order, the calibration and dampening the row names) "
        "are scored on the same windows; the difference is paired "
        "window by window, ± is the 95% interval (1.96 standard errors over windows). "
        "\"Gap closed\" is the share of RTN's log-perplexity gap to fp32 that GPTQ removes. "
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}.",
        "",
        "| scheme | GPTQ calibration | corpus | windows | fp32 ppl | RTN ppl | GPTQ ppl | GPTQ − RTN (log ppl) "
        "| gap closed | RTN KL | GPTQ KL |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = _kept_rows(path)  # runs whose json is gone keep their rows
    for f in files:
        r = json.loads(f.read_text())
        rows[(r["scheme"], _calibration(r))] = [
            f"| {r['scheme']} | {_calibration(r)} | {corpus} | {s['windows']} | {s['ppl']['fp32']:.2f} "
            f"| {s['ppl']['rtn']:.2f} "
            f"| {s['ppl']['gptq']:.2f} | {s['gptq_minus_rtn_logppl']:+.4f} ± {Z95 * s['se']:.4f} "
            f"| {100 * s['gap_closed']:.0f}% ± {100 * Z95 * s['gap_closed_se']:.0f}% "
            f"| {s['kl']['rtn']:.3f} | {s['kl']['gptq']:.3f} |"
            for corpus, s in ((c, r[c]) for c in ("pydoc", "prose"))]
    lines += [row for pair in rows.values() for row in pair] + ["", MARK_END]
    write_section(path, MARK_BEGIN, MARK_END, lines)


def _kept_rows(path: Path) -> dict[tuple[str, str], list[str]]:
    """The table rows already in ``path``'s section, by (scheme, calibration), in their order."""
    rows: dict[tuple[str, str], list[str]] = {}
    for line in read_section(path, MARK_BEGIN, MARK_END).splitlines():
        cells = [c.strip() for c in line.split("|")]
        if line.startswith("| ") and cells[1] != "scheme":
            rows.setdefault((cells[1], cells[2]), []).append(line)
    return rows


if __name__ == "__main__":
    main()
