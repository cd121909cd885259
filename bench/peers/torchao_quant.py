"""torchao as a peer: its weight-only configurations that run on the CPU, through ``quantize_``.

    <torchao venv>/bin/python bench/peers/torchao_quant.py --model FOLDER --bits 4 --group 64 --work WORK --out DIR

Runs inside torchao's own virtual environment (``bench/peers/setup.sh torchao``). Loads the
fp32 folder, then ``torchao.quantization.quantize_`` swaps the weight of every ``nn.Linear`` of
the decoder blocks for one of torchao's quantized tensor subclasses (``lm_head`` and the tied
embeddings stay fp32, as in lowbit's default plan); the quantize seconds cover that call.

* ``--bits 8``: ``Int8WeightOnlyConfig()`` (version 2, ``PerRow``): symmetric int8 codes, one
  scale per output row; its linear dequantizes and calls ``F.linear`` on the CPU.
* ``--bits 4``: ``PrototypeInt4WeightOnlyConfig(group_size)``: the CPU layout
  (``Int4OpaqueTensor``, ``torchao.prototype.quantization.int4``). torchao 0.18's stable
  ``Int4WeightOnlyConfig`` packings (plain, preshuffled, tile-packed) target CUDA/XPU kernels;
  this is the one whose linear calls ``aten._weight_int4pack_mm_for_cpu``. Its grid is
  tinygemm's: unsigned codes 0..15 with a per-group scale and a FLOAT zero (``min``-based,
  ``preserve_zero=False``), i.e. lowbit's ``uint4_fz``. This path is torchao's for bfloat16
  models: measured here on one core, a 512x576 by 576x1536 product takes 17 ms with bfloat16
  activations and 1,020 ms with float32 ones (dense float32: 11 ms), so a float32 run would
  take hours to score. The int4 model is therefore loaded in bfloat16 (``--dtype``), as
  torchao's own examples do; its scores include bfloat16 activations and a bfloat16
  ``lm_head``, and its size counts them.

torchao skips, with only an info log, any layer whose input width is not a multiple of the
group; at group 128 that is every 576-wide layer of SmolLM2. A run that leaves a targeted
layer unquantized is therefore refused here with the count, rather than scored as if quantized.

The live model (torchao's own subclasses and kernels, eager: no ``torch.compile``, like every
other tool here) is handed to ``peer_eval``. It is saved as torchao documents, ``torch.save`` of
the ``state_dict`` (``DIR/model/model.pt``: a pickle, which this benchmark only writes and never
loads), for the size on disk. ``bpw`` is counted from the stored tensors themselves: the bytes
of every inner tensor (codes, scales, zeros) of the quantized weights over their element count.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import time
from pathlib import Path

import torch


def stored_bits(weight) -> int:
    """Bits torchao keeps for one quantized weight: every inner tensor of the subclass."""
    names, _ = weight.__tensor_flatten__()
    return sum(8 * t.numel() * t.element_size() for t in (getattr(weight, n) for n in names) if t is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the fp32 Hugging Face folder")
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4)
    ap.add_argument("--group", type=int, default=64, help="int4 inputs per group (torchao offers 32, 64, 128, 256)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="model dtype (default: bfloat16 for --bits 4, the dtype its CPU kernel is built for; float32 for 8)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from transformers import AutoModelForCausalLM

    from peer_eval import finish

    torch.manual_seed(0)
    dtype = args.dtype or ("bfloat16" if args.bits == 4 else "float32")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, dtype)).eval()
    targets = {name: m for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")}
    if not targets:
        raise RuntimeError("no nn.Linear under model.layers.*: torchao's runner expects a decoder-only HF model")
    if args.bits == 4:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        config = PrototypeInt4WeightOnlyConfig(group_size=args.group)
    else:
        config = Int8WeightOnlyConfig()
    t0 = time.perf_counter()
    quantize_(model, config, filter_fn=lambda m, fqn: fqn in targets)
    seconds = time.perf_counter() - t0

    plain = [name for name, m in targets.items() if type(m.weight.data) is torch.Tensor]
    if plain:
        raise RuntimeError(f"torchao left {len(plain)} of {len(targets)} layers unquantized at group {args.group} "
                           f"(input widths not a multiple of it, e.g. {plain[0]}: "
                           f"{targets[plain[0]].in_features}); it skips them silently")
    weights = sum(m.weight.numel() for m in targets.values())
    bits = sum(stored_bits(m.weight.data) for m in targets.values())
    kind = type(next(iter(targets.values())).weight.data).__name__

    saved = args.out / "model"
    saved.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), saved / "model.pt")
    model.config.save_pretrained(saved)

    finish(args.out, model, args.work, tool="torchao", version=importlib.metadata.version("torchao"),
           quantize_seconds=seconds, bpw=bits / weights, saved=saved,
           settings={"config": type(config).__name__, "bits": args.bits,
                     "group_size": args.group if args.bits == 4 else "per row", "weight_class": kind,
                     "layers": len(targets), "dtype": dtype, "compile": False})


if __name__ == "__main__":
    from _main import run

    run(main)
