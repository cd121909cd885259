"""optimum-quanto as a peer: quantize the decoder's linear weights with ``quantize`` + ``freeze``.

    <quanto venv>/bin/python bench/peers/quanto_quant.py --model FOLDER --bits 4 [--group 64] --work WORK --out DIR

Runs inside quanto's own virtual environment (``bench/peers/setup.sh quanto``). Loads the fp32
folder, then ``optimum.quanto.quantize(model, weights=qint4|qint8, include="model.layers.*")``
turns every ``Linear`` of the decoder blocks into a ``QLinear`` (``lm_head`` and the embeddings
stay fp32, as in lowbit's default plan) and ``freeze`` replaces its weight by quanto's packed
tensor; quantize seconds cover both calls. The live model (quanto's own ``QLinear`` forward:
on CPU with fp32 scales, its generic unpack-and-dequantize matmul) is handed to ``peer_eval``.

What quanto stores (weights only, activations stay fp32; scales take the model's dtype, fp32):

* ``--bits 8`` (``qint8``, ``AbsmaxOptimizer``): symmetric, one scale per output row
  (``absmax / 127``), int8 codes, no zero point. bpw = 8 + 32 / in_features.
* ``--bits 4`` (``qint4``, ``MaxOptimizer``): asymmetric min-max, uint8 codes 0..15 packed two
  per byte, ``scale = (max - min) / 15`` and a FLOAT shift ``-min`` per group (``q = round((w -
  min) / scale)``, ``w ≈ q * scale + min``; quanto's ``zeropoint=False`` default), both fp32.
  bpw = 4 + (32 + 32) / group. The group size is not a quanto option: ``QModuleMixin`` picks 128,
  stepping down by 32 (96, 64, 32) until it divides ``in_features``; SmolLM2's 576-wide inputs
  thus get groups of 96 and its 1536-wide ``down_proj`` groups of 128. ``--group N`` overrides
  that choice by setting each ``QLinear``'s ``weight_group_size`` before ``freeze`` (not a public
  API; quanto's own reload would re-derive its default and cannot read such a checkpoint back).

The bpw in ``result.json`` is counted from the frozen tensors themselves (code bits plus the
bytes of every scale and shift over the quantized weights). The model is saved the way quanto's
README does it: ``DIR/model/model.safetensors`` (the quantized ``state_dict``, tied
``lm_head`` dropped) plus ``quantization_map.json``, the two files ``requantize`` reloads from.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="fp32 Hugging Face folder")
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4)
    ap.add_argument("--group", type=int, default=0,
                    help="int4 inputs per group; 0 (default): quanto's own choice (128, or the largest of 96, 64, 32 "
                    "dividing in_features)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.bits == 8 and args.group:
        raise SystemExit("--group applies to --bits 4 only: quanto's qint8 weights are per output channel")

    from optimum.quanto import QModuleMixin, freeze, qint4, qint8, quantization_map, quantize
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from peer_eval import finish

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    t0 = time.perf_counter()
    quantize(model, weights=qint4 if args.bits == 4 else qint8, include="model.layers.*")
    qmodules = {name: m for name, m in model.named_modules() if isinstance(m, QModuleMixin)}
    if not qmodules:
        raise RuntimeError("quanto quantized no layer: check the model's module names (model.layers.*)")
    if args.group:
        for m in qmodules.values():
            m.weight_group_size = args.group
    freeze(model)
    seconds = time.perf_counter() - t0

    groups: dict[int, int] = {}  # group size -> layers using it
    weights = stored_bits = 0
    for m in qmodules.values():
        w = m.weight
        weights += w.numel()
        stored_bits += args.bits * w.numel() + 8 * sum(t.numel() * t.element_size() for t in (w._scale, getattr(w, "_shift", None))
                                                        if t is not None)
        g = (m.weight_group_size or m.in_features) if args.bits == 4 else 0
        groups[g] = groups.get(g, 0) + 1
    scale = next(iter(qmodules.values())).weight._scale

    saved = args.out / "model"
    saved.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the same tensor as the embeddings; safetensors refuses shared storage
    save_file(state, str(saved / "model.safetensors"))
    (saved / "quantization_map.json").write_text(json.dumps(quantization_map(model), indent=1))
    model.config.save_pretrained(saved)

    finish(args.out, model, args.work, tool="quanto", version=importlib.metadata.version("optimum-quanto"),
           quantize_seconds=seconds, bpw=stored_bits / weights, saved=saved,
           settings={"weights": "qint4" if args.bits == 4 else "qint8", "bits": args.bits,
                     "group_size": args.group or "quanto default", "groups_used": {str(k): v for k, v in groups.items()},
                     "symmetric": args.bits == 8, "zero_point": "float shift" if args.bits == 4 else None,
                     "scale_dtype": str(scale.dtype).removeprefix("torch."), "layers": len(qmodules),
                     "weight_class": type(next(iter(qmodules.values())).weight).__name__})


if __name__ == "__main__":
    from _main import run

    run(main)
