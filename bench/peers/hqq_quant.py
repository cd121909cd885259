"""HQQ as a peer: quantize a model with the ``hqq`` package and save what its layers compute.

    <hqq venv>/bin/python bench/peers/hqq_quant.py --model smollm2-135m --nbits 4 --group 64 --out DIR

Runs inside HQQ's own virtual environment (``bench/peers/setup.sh hqq``). Every linear layer
of the decoder blocks becomes an ``hqq.core.quantize.HQQLinear`` with HQQ's defaults for
``BaseQuantizeConfig(nbits, group_size)`` (axis 1, zero-point optimizer on, float32 compute on
CPU); ``lm_head`` and the embeddings stay fp32, as in lowbit's default plan. The script then
writes ``DIR/model.safetensors``: each quantized layer's weight as ``HQQLinear.dequantize()``
returns it (every other tensor is untouched, so it is not saved), which is exactly the matrix HQQ's PyTorch backend multiplies by,
so lowbit's evaluator scores HQQ's numerics without HQQ installed (``bench/gptq.py``).
With ``--work`` (``bench/compare.py``), the model is saved with HQQ's own
``save_quantized`` instead and the live HQQ model is scored by ``peer_eval``. ``DIR/result.json`` holds
the quantization seconds (``quantize_model`` alone, excluding loading) and the bits per weight
HQQ's own format stores: ``nbits`` plus an fp16 scale and zero per group.
"""
from __future__ import annotations

import argparse
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
    ap.add_argument("--nbits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=None,
                    help="side-by-side mode (bench/compare.py): save with HQQ's own format and evaluate the live model")
    args = ap.parse_args()

    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel

    from lowbit.hf.load import load_model

    torch.manual_seed(0)
    model = load_model(args.model).model.eval()  # fp32 (lowbit loads GGUF dequantized)
    HQQLinear.set_backend(HQQBackend.PYTORCH)
    t0 = time.perf_counter()
    AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(nbits=args.nbits, group_size=args.group),
                                  compute_dtype=torch.float32, device="cpu")
    seconds = time.perf_counter() - t0
    if args.work is not None:
        from peer_eval import finish

        saved = args.out / "model"
        AutoHQQHFModel.save_quantized(model, str(saved))
        finish(args.out, model, args.work, tool="hqq", version=importlib.metadata.version("hqq"),
               quantize_seconds=seconds, bpw=args.nbits + 2 * 16 / args.group, saved=saved,
               settings={"nbits": args.nbits, "group_size": args.group, "backend": "pytorch", "compute": "float32"})
        return

    state, quantized, params = {}, [], 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, HQQLinear):
                w = module.dequantize().float().reshape(module.meta["shape"]).contiguous()
                state[f"{name}.weight"] = w
                quantized.append(name)
                params += w.numel()
                if module.bias is not None:
                    state[f"{name}.bias"] = module.bias.detach().float().contiguous()
    if not quantized:
        raise SystemExit("hqq quantized no layer: check the model's linear layers")
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "model.safetensors.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, args.out / "model.safetensors")
    result = {"tool": "hqq", "version": importlib.metadata.version("hqq"), "nbits": args.nbits,
              "group_size": args.group, "quantize_seconds": seconds, "layers": len(quantized),
              "bpw": args.nbits + 2 * 16 / args.group, "quantized_params": params}
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    from _main import run

    run(main)
