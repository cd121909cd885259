"""llm-compressor as a peer: quantize with its GPTQ or round-to-nearest modifier and save what its layers compute.

    <llmcompressor venv>/bin/python bench/peers/llmcompressor_quant.py --method gptq --bits 4 --group 64 \\
        [--asym] [--samples 32] [--seq-len 512] --out DIR

Runs inside llm-compressor's own virtual environment (``bench/peers/setup.sh llmcompressor``).
Every ``Linear`` of the decoder blocks gets a compressed-tensors scheme of ``--bits``-bit
integer weights in groups of ``--group`` inputs (symmetric, like the ``W4A16`` preset, or
asymmetric with ``--asym``); ``lm_head`` and the embeddings stay fp32, as in lowbit's plan.

* ``--method gptq``: ``GPTQModifier`` with llm-compressor's defaults (dampening 0.01, static
  activation order, block 128), calibrated on exactly the windows lowbit's GPTQ uses:
  ``lowbit.calib.calibration_windows(tokenizer, "pydoc", samples, seq_len)``, passed as token
  ids, one window per sample, unshuffled (their SHA-256 is in result.json so the harness can
  check it).
* ``--method rtn``: ``QuantizationModifier`` (min-max round-to-nearest, no data).

The script writes ``DIR/model.safetensors`` with each quantized layer's weight as
compressed-tensors' own ``fake_quantize`` returns it from the layer's stored scale and zero
point (the matrix llm-compressor's quantized forward multiplies by), so lowbit's evaluator
scores llm-compressor's numerics. ``DIR/result.json`` holds the quantization seconds (``oneshot``
alone, excluding loading) and the bits per weight of compressed-tensors' pack-quantized
storage: ``bits`` plus an fp16 scale per group, plus a ``bits``-wide zero per group when
asymmetric (counted as lowbit counts its own).

With ``--work`` (``bench/compare.py``) it calibrates on the work folder's windows instead, saves
the model with ``save_pretrained(save_compressed=True)`` (pack-quantized compressed-tensors, what
vLLM loads) and hands the live model, llm-compressor's own quantized forward, to ``peer_eval``.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", choices=("gptq", "rtn", "sparsegpt", "wanda"), default="gptq")
    ap.add_argument("--sparsity", type=float, default=0.5, help="sparsegpt/wanda: fraction of weights pruned")
    ap.add_argument("--pattern", default=None, help="sparsegpt/wanda: N:M mask structure, e.g. 2:4")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64, help="inputs per group; 0: per output channel")
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=None, help="side-by-side mode (bench/compare.py): calibrate on "
                    "the work folder's windows, save compressed-tensors and evaluate the live model")
    args = ap.parse_args()

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from lowbit.calib import calibration_windows
    from lowbit.hf.load import load_model

    torch.manual_seed(0)
    loaded = load_model(args.model)  # fp32 (lowbit loads GGUF dequantized)
    model, tok = loaded.model.eval(), loaded.tokenizer
    if args.method in ("sparsegpt", "wanda"):
        return prune(args, model, tok)
    if args.group:
        weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=not args.asym, strategy="group",
                                   group_size=args.group)
    else:  # --group 0: one scale per output channel (the W8A16 preset's strategy)
        weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=not args.asym, strategy="channel")
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    kwargs: dict = {}
    digest = None
    if args.method == "gptq":
        recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"])
        if args.work is not None:
            from peer_eval import calibration

            ids = calibration(args.work)  # (samples, seq_len) int64, the windows every calibrated tool uses
            args.samples, args.seq_len = ids.shape
        else:
            ids = calibration_windows(tok, "pydoc", args.samples, args.seq_len)  # (samples, seq_len) int64
        digest = hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()
        data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        kwargs = dict(dataset=data, num_calibration_samples=args.samples, max_seq_length=args.seq_len,
                      shuffle_calibration_samples=False)
    else:
        recipe = QuantizationModifier(config_groups=groups, ignore=["lm_head"])
    from peer_eval import linear_shapes

    shapes = linear_shapes(model)
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tok, recipe=recipe, **kwargs)
    seconds = time.perf_counter() - t0
    from peer_eval import group_bpw

    # fp16 scale per group, plus a bits-wide integer zero when asymmetric
    bpw = group_bpw(shapes, args.bits, args.group, 16 + (args.bits if args.asym else 0))
    if args.work is not None:
        from peer_eval import finish

        saved = args.out / "model"
        model.save_pretrained(saved, save_compressed=True)  # compressed-tensors pack-quantized, as vLLM loads it
        finish(args.out, model, args.work, tool="llm-compressor", version=importlib.metadata.version("llmcompressor"),
               quantize_seconds=seconds, bpw=bpw, saved=saved,
               settings={"method": args.method, "bits": args.bits, "group_size": args.group, "symmetric": not args.asym,
                         "samples": args.samples if args.method == "gptq" else 0, "calibration_sha256": digest})
        return

    state, quantized, params = {}, [], 0
    with torch.no_grad():
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or scheme.weights is None or not hasattr(module, "weight_scale"):
                continue
            zero = getattr(module, "weight_zero_point", None)
            w = fake_quantize(module.weight.float(), module.weight_scale.float(),
                              zero if zero is not None else torch.zeros_like(module.weight_scale),
                              scheme.weights)
            state[f"{name}.weight"] = w.float().contiguous()
            quantized.append(name)
            params += w.numel()
    if not quantized:
        raise SystemExit("llm-compressor quantized no layer: check the model's linear layers")
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "model.safetensors.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, args.out / "model.safetensors")
    result = {"tool": "llmcompressor", "version": importlib.metadata.version("llmcompressor"),
              "method": args.method, "bits": args.bits, "group_size": args.group, "symmetric": not args.asym,
              "samples": args.samples if args.method == "gptq" else 0, "seq_len": args.seq_len,
              "calibration_sha256": digest, "quantize_seconds": seconds, "layers": len(quantized),
              "bpw": bpw, "quantized_params": params}
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


def prune(args, model, tok) -> None:
    """llm-compressor's SparseGPT or Wanda modifier with its defaults, on the work folder's windows,
    every Linear of the decoder blocks (lm_head left dense, as in lowbit's plan); the live pruned
    model is scored. Weights stay fp32, so bits/weight is 32."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from peer_eval import calibration, finish

    ids = calibration(args.work)  # (samples, seq_len) int64, the windows every calibrated tool uses
    args.samples, args.seq_len = ids.shape
    digest = hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    structure = args.pattern or "0:0"
    cls = SparseGPTModifier if args.method == "sparsegpt" else WandaPruningModifier
    recipe = cls(sparsity=args.sparsity, mask_structure=structure, targets=["Linear"], ignore=["lm_head"])
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tok, recipe=recipe, dataset=data, num_calibration_samples=args.samples,
            max_seq_length=args.seq_len, shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    zeros, total = 0, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    saved = args.out / "model"
    model.save_pretrained(saved)
    finish(args.out, model, args.work, tool="llm-compressor", version=importlib.metadata.version("llmcompressor"),
           quantize_seconds=seconds, bpw=32.0, saved=saved, sparsity=zeros / total,
           settings={"method": args.method, "sparsity": args.sparsity, "mask_structure": structure,
                     "samples": args.samples, "calibration_sha256": digest})


if __name__ == "__main__":
    from _main import run

    run(main)
