"""Brevitas as a peer: weight-only quantization with its LLM quantizers, GPTQ or round-to-nearest.

    <brevitas venv>/bin/python bench/peers/brevitas_quant.py --model FOLDER --work WORK --out DIR \\
        [--format int --bits 4 --group 64 [--asym] [--scale float|po2] | --format fp8 --group 0] \\
        [--method gptq|rtn] [--act-order]

Runs inside brevitas's own virtual environment (``bench/peers/setup.sh brevitas``). Loads the
fp32 folder, then quantizes as brevitas's LLM entry point (``brevitas_examples.llm.main``) does
for a weight-only run: ``generate_quantizers`` + ``generate_quant_maps`` +
``layerwise_quantize`` from ``brevitas_examples.common.generative.quantize`` turn every
``nn.Linear`` of the decoder blocks into a ``brevitas.nn.QuantLinear`` (``lm_head`` blacklisted,
as ``main.py`` does unless ``--quantize-last-layer``; the tied embeddings untouched; no input
quantizer, so activations stay float). The quantizer is the one ``main.py`` picks from its
defaults: ``stats`` parameters (abs-max for symmetric, min/max for asymmetric), scales held as
standalone parameters initialized from the weights on one forward pass
(``parameter_from_stats``), ``narrow_range=False``:

* ``--format int``: ``--bits``-bit integers; ``--group G`` inputs per group
  (``IntWeightSymmetricGroupQuant``, or ``ShiftedUint8WeightGroupQuantFloat`` with ``--asym``:
  an unsigned grid with a float zero point, not quantized, as ``main.py`` defaults to),
  ``--group 0`` per output channel; ``--scale po2`` asks for power-of-two scales (brevitas
  maps per-group po2 to its MX quantizers);
* ``--format fp8``: OCP FP8 E4M3 (``Fp8e4m3OCPWeightPerChannelFloat`` per output channel with
  ``--group 0``, ``Fp8e4m3OCPWeightSymmetricGroupQuant`` otherwise), float scales.

``--method gptq`` runs brevitas's ``brevitas.graph.gptq.gptq_mode`` with its defaults (dampening
0.01 of the mean Hessian diagonal, 100 lazy-update sub-blocks per matrix, no activation order
unless ``--act-order``, float32 Hessians on the CPU, float activations) block by block, like
``brevitas_examples.llm.llm_quant.gpxq.block_optimization`` (``--gpxq-block-name model.layers``):
the work folder's calibration windows, one per forward, are captured at the first decoder
block, each block is optimized on them layer by layer in execution order, and its quantized
output feeds the next. That helper hard-codes ``cuda`` for its inputs, so the same loop is
written here for the CPU. The scales are fixed from the original weights before GPTQ (brevitas
initializes them on the first forward), so GPTQ rounds onto a static grid. ``--method rtn``
stops after the scale initialization.

Quantize seconds cover ``layerwise_quantize``, the initializing forward and GPTQ. The live
brevitas model is scored under ``brevitas.export.inference.quant_inference_mode`` (what
``main.py`` evaluates under: weights fake-quantized by the inference handlers, no QuantTensor).
Brevitas keeps float weights plus quantizer parameters and has no compact format that works
here (its vLLM export needs vllm and writes float weights; its GGUF export only knows
Q4_0/Q4_1/Q8_0's 32-weight blocks), so nothing is saved: ``saved=None`` and a ``note``.
``bpw`` counts the parameters brevitas holds for a quantized weight: ``bits`` per code plus, per
group (per output row with ``--group 0``), one float32 scale (the model's dtype) and, with
``--asym``, one float32 zero point (``bits`` wide with ``--int-zero``); ``bpw_fp16`` is the same
with 16-bit scales and zeros, as the peers that store fp16 count theirs.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
from pathlib import Path

import torch


def _quantize(model, args) -> None:
    """Brevitas's LLM flow, weight-only: QuantLinear everywhere but lm_head, scale init, then GPTQ."""
    from brevitas_examples.common.generative.quantize import generate_quant_maps, generate_quantizers
    from brevitas.graph.quantize import layerwise_quantize

    fmt = "int" if args.format == "int" else "float_ocp_e4m3"
    quantizers = generate_quantizers(
        weight_bit_width=args.bits if args.format == "int" else 8,
        weight_param_method="stats",
        weight_scale_precision=f"{args.scale}_scale",
        weight_quant_type="asym" if args.asym else "sym",
        weight_quant_granularity="per_group" if args.group else "per_channel",
        weight_group_size=args.group,
        weight_scaling_impl_type="parameter_from_stats",
        quantize_weight_zero_point=args.int_zero,
        weight_quant_format=fmt,
        # main.py's input defaults: unused with input_bit_width=None (float activations), but parsed
        input_quant_format="int", input_scale_precision="float_scale", input_scale_type="static",
        input_param_method="stats", input_quant_type="asym", input_quant_granularity="per_tensor",
        quant_attn_mode="sdpa", scaling_min_val=1e-4)
    layer_map = generate_quant_maps(**quantizers, dtype=torch.float32, device=None, quantize_embedding=False)
    layerwise_quantize(model=model, compute_layer_map=layer_map, name_blacklist=["lm_head", "embed_out"])
    model.eval()


@torch.no_grad()
def _gptq_blockwise(model, calib: torch.Tensor, act_order: bool) -> None:
    """``block_optimization`` of brevitas's LLM example with ``gptq_mode``, on the CPU.

    Inputs of ``model.model.layers[0]`` are captured for every calibration window; each block is
    then run once per layer under ``gptq_mode`` (a forward stops at the layer being optimized,
    ``update`` runs GPTQ on it), and the quantized block's outputs become the next block's inputs.
    """
    from brevitas.graph.gptq import gptq_mode
    from brevitas.utils.torch_utils import StopFwdException

    blocks = model.model.layers
    cached_args, cached_kwargs = [], []

    def intercept_input(module, args, kwargs):
        cached_args.append(args)
        cached_kwargs.append(kwargs)
        raise StopFwdException

    hook = blocks[0].register_forward_pre_hook(intercept_input, with_kwargs=True)
    for w in calib:
        try:
            model(input_ids=w[None], use_cache=False)
        except StopFwdException:
            pass
    hook.remove()
    t0 = time.perf_counter()
    for index, block in enumerate(blocks):
        with gptq_mode(block, act_order=act_order, use_quant_activations=False, create_weight_orig=False,
                       device="cpu", dtype=torch.float32) as gptq:
            for _ in range(gptq.num_layers):
                for args, kwargs in zip(cached_args, cached_kwargs):
                    block(*args, **kwargs)
                gptq.update()
        if index < len(blocks) - 1:
            outs = []
            for args, kwargs in zip(cached_args, cached_kwargs):
                out = block(*args, **kwargs)
                outs.append((out[0] if isinstance(out, tuple) else out,))
            cached_args = outs
        print(f"[brevitas] GPTQ block {index + 1}/{len(blocks)}: {time.perf_counter() - t0:.0f} s", file=sys.stderr,
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the fp32 Hugging Face folder")
    ap.add_argument("--format", choices=("int", "fp8"), default="int", help="fp8: OCP FP8 E4M3 weights")
    ap.add_argument("--bits", type=int, default=4, help="integer code bits (--format int)")
    ap.add_argument("--group", type=int, default=64, help="inputs per group; 0: one scale per output channel")
    ap.add_argument("--asym", action="store_true", help="asymmetric integer grid with a zero point per group")
    ap.add_argument("--int-zero", action="store_true", help="with --asym: quantize the zero point to an integer")
    ap.add_argument("--scale", choices=("float", "po2"), default="float", help="scale precision")
    ap.add_argument("--method", choices=("gptq", "rtn"), default="gptq")
    ap.add_argument("--act-order", action="store_true", help="GPTQ activation order (brevitas's default: off)")
    ap.add_argument("--cache-quant-weight", action="store_true",
                    help="evaluate with quant_inference_mode(cache_quant_weight=True): the fake-quantized weights "
                         "are computed once instead of at every forward (main.py's evaluation does not)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.format == "fp8" and (args.asym or args.scale != "float"):
        raise SystemExit("--format fp8 is symmetric with float scales here")

    from transformers import AutoModelForCausalLM

    from brevitas.export.inference import quant_inference_mode
    from peer_eval import calibration, finish, group_bpw, linear_shapes

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    model.config.use_cache = False  # as brevitas's LLM example quantizes; restored before evaluation
    calib = None
    if args.method == "gptq" or args.work is not None:
        if args.work is None:
            raise SystemExit("--method gptq needs --work (its calibration windows)")
        calib = calibration(args.work)
    shapes = linear_shapes(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        _quantize(model, args)
        model(input_ids=calib[:1], use_cache=False)  # initializes the scales from the weights, as main.py does
        if args.method == "gptq":
            _gptq_blockwise(model, calib, args.act_order)
    seconds = time.perf_counter() - t0
    model.config.use_cache = True
    bits = args.bits if args.format == "int" else 8
    zero_bits = (bits if args.int_zero else 32) if args.asym else 0
    bpw = group_bpw(shapes, bits, args.group, 32 + zero_bits)
    bpw16 = group_bpw(shapes, bits, args.group, 16 + (bits if args.int_zero else 16 if args.asym else 0))
    quantized = sum(1 for m in model.modules() if type(m).__name__ == "QuantLinear")
    with quant_inference_mode(model, cache_quant_weight=args.cache_quant_weight):
        finish(args.out, model, args.work, tool="brevitas", version=importlib.metadata.version("brevitas"),
               quantize_seconds=seconds, bpw=bpw, bpw_fp16=bpw16, saved=None,
               note="brevitas is fake-quant: float weights plus quantizer parameters; no compact export usable "
                    "here (vLLM export needs vllm, GGUF export needs 32-weight blocks), so nothing is saved",
               settings={"format": "int" if args.format == "int" else "fp8_e4m3_ocp", "bits": bits,
                         "group_size": args.group, "symmetric": not args.asym,
                         "zero_point": ("int" if args.int_zero else "float") if args.asym else None,
                         "scale": args.scale, "param_method": "stats", "narrow_range": False,
                         "method": args.method, "layers": quantized,
                         "gptq": {"act_order": args.act_order, "damp": 0.01, "num_blocks": 100,
                                  "blockwise": "model.layers", "use_quant_activations": False}
                         if args.method == "gptq" else None,
                         "samples": 0 if args.method == "rtn" else int(calib.shape[0]),
                         "inference": "quant_inference_mode" + ("(cache_quant_weight)" if args.cache_quant_weight else "")})


if __name__ == "__main__":
    from _main import run

    run(main)
