"""How much of its bias correction should each layer take? A probe on SmolLM2-135M.

    python3 bench/bias_correction.py [--windows 16] [--scheme uint4:g128] [--samples 32] [--only LABEL ...]

Round to nearest, then ``bias-correction`` calibrated on ``--samples`` pydoc windows of 512
tokens, with the whole correction (``shrink=1``, the paper's), half of it, the per-layer search
(``shrink="auto"``, the default), and the whole correction on subsets of the layers (a recipe stage
with ``targets``), and the whole correction calibrated on the prose corpus's calibration half
instead (is the loss out of domain a domain shift?). Each variant is scored on the first ``--windows`` windows of pydoc's evaluation
half and of the prose evaluation half (``corpora.prose_split``), as perplexity over fp32's.
Results go to bench/out/bias_correction.json (``--only`` runs some variants and keeps the others'
earlier rows) and are printed as a markdown table; the table in
``lowbit/modifiers/bias_correction.py`` comes from this probe.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VARIANTS = {  # label -> (shrink, targets regex of the correction stage or None, calibration corpus)
    "none (round to nearest)": None,
    "full, every layer (shrink=1)": (1, None, "pydoc"),
    "half, every layer (shrink=0.5)": (0.5, None, "pydoc"),
    "searched per layer (shrink=auto, the default)": ("auto", None, "pydoc"),
    "full, q/k/gate/up only": (1, r"(q_proj|k_proj|gate_proj|up_proj)$", "pydoc"),
    "full, v/o/down only": (1, r"(v_proj|o_proj|down_proj)$", "pydoc"),
    "full, o/down only": (1, r"(o_proj|down_proj)$", "pydoc"),
    "full, every layer, calibrated on prose": (1, None, "prose"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--scheme", default="uint4:g128")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--only", action="append", default=None, metavar="LABEL",
                    help="a variant to run, repeatable (default: all; labels hold commas)")
    args = ap.parse_args()
    chosen = args.only or list(VARIANTS)
    unknown = [label for label in chosen if label not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; the variants are: {', '.join(VARIANTS)}")

    import lowbit
    from corpora import prose_split
    from lowbit.calib import calibration_windows
    from lowbit.eval.corpus import split_pydoc, token_windows
    from lowbit.eval.perplexity import perplexity
    from lowbit.hf.load import load_model
    from lowbit.modifiers import make
    from lowbit.recipe import Recipe, Stage

    torch.manual_seed(0)
    loaded = load_model("smollm2-135m")
    base, tok = loaded.model.eval(), loaded.tokenizer
    evals = {"pydoc": token_windows(tok, split_pydoc()[1], 512, args.windows),
             "prose": token_windows(tok, prose_split()[1], 512, args.windows)}
    calib = {"pydoc": calibration_windows(tok, "pydoc", args.samples, 512, model=base),
             "prose": token_windows(tok, prose_split()[0], 512, args.samples)}
    ref = {k: perplexity(base, w, progress=False).ppl for k, w in evals.items()}
    out = HERE / "out" / "bias_correction.json"
    earlier = json.loads(out.read_text()) if out.exists() else {}
    same = {k: earlier.get(k) for k in ("scheme", "samples", "windows")} == \
        {"scheme": args.scheme, "samples": args.samples, "windows": args.windows}
    rows = earlier.get("rows", {}) if same else {}
    for label in chosen:
        variant = VARIANTS[label]
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        if variant is None:
            lowbit.quantize(model, args.scheme, method="rtn", progress=False)
        else:
            shrink, targets, corpus = variant
            recipe = Recipe((Stage(make("rtn")), Stage(make("bias-correction", shrink=shrink), targets=targets)))
            lowbit.quantize(model, args.scheme, method=recipe, calib=calib[corpus], progress=False)
        seconds = time.perf_counter() - t0
        rows[label] = {**{k: perplexity(model, w, progress=False).ppl / ref[k] for k, w in evals.items()},
                       "seconds": seconds}
        print(label, rows[label], flush=True)
    rows = {label: rows[label] for label in VARIANTS if label in rows}  # the table's order
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"scheme": args.scheme, "samples": args.samples, "windows": args.windows,
                               "fp32": ref, "rows": rows}, indent=1))
    print(f"| correction ({args.scheme}, {args.samples} pydoc windows) | pydoc | prose | seconds |\n|---|---:|---:|---:|")
    for label, r in rows.items():
        print(f"| {label} | {r['pydoc']:.3f}× | {r['prose']:.3f}× | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
