"""auto-round as a peer: SignRound (signed-gradient tuning of rounding and clipping), W4A16 on the CPU.

    <autoround venv>/bin/python bench/peers/autoround_quant.py --model FOLDER --bits 4 --group 128 \\
        [--iters 200] [--asym] --work WORK --out DIR

Runs inside auto-round's own virtual environment (``bench/peers/setup.sh autoround``). Loads the
fp32 folder and runs ``auto_round.AutoRound(model, tokenizer, scheme="W4A16", group_size=G,
bits=B, sym=..., dataset=<the work folder's calibration windows>, nsamples, seqlen, iters)``
with ``device_map="cpu"``, then ``quantize_and_save(DIR/model, format="auto_round")``: auto-round's
own packed checkpoint (int32-packed codes, fp16 scales, packed integer zeros), which gives the
size on disk. The runner's own defaults are auto-round's (``iters=200`` of SignRound per block,
learning rate ``1/iters``, batch size 8, ``lm_head`` not quantized); the calibration windows are
the work folder's token tensors, passed as a list of (1, L) batches, so auto-round tokenizes nothing.

On this 2-core CPU one SignRound step of a SmolLM2 block (batch 8 x 512 tokens) takes about
1.1 s (measured: 9.8 s a block at 8 steps), so the default 200 steps would take about 110
minutes per configuration. The benchmark therefore runs auto-round's own "light" recipe
(``auto-round --light``: 50 steps, learning rate 5e-3), about a quarter of that. auto-round
turns on ``torch.compile`` from 10 steps up; it is off here (``--compile`` turns it on),
because compiling the first block alone took over 4 minutes on this machine.

Quantize seconds cover ``quantize_and_save``, because auto-round's public call does both; the
save of a 135M model is a small part of it. The model scored by ``peer_eval`` is the saved
checkpoint loaded back as a user loads it, ``AutoModelForCausalLM.from_pretrained`` with
auto-round's transformers integration, which picks auto-round's own CPU backend (its kernels
and modules, whatever it selects on this machine: recorded as ``backend``).

``bpw`` is counted from the saved checkpoint: the bytes of every tensor of the quantized layers
(``qweight``, ``scales``, ``qzeros``) over their weight count.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import time
from pathlib import Path

import torch


def checkpoint_bpw(folder: Path, layers: dict[str, int]) -> float:
    """Stored bits per weight of ``layers`` (prefix -> weight count) in the saved safetensors."""
    from safetensors import safe_open

    bits = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                if name.rsplit(".", 1)[0] in layers and not name.endswith(".bias"):
                    t = st.get_tensor(name)
                    bits += 8 * t.numel() * t.element_size()
    return bits / sum(layers.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the fp32 Hugging Face folder")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--asym", action="store_true", help="asymmetric (auto-round's W4A16 default is symmetric)")
    ap.add_argument("--iters", type=int, default=200, help="SignRound steps per block (auto-round's default: 200)")
    ap.add_argument("--lr", type=float, default=None, help="SignRound learning rate (auto-round's default: 1/iters)")
    ap.add_argument("--compile", action="store_true",
                    help="let auto-round torch.compile its block step (off: on this CPU compiling one block took "
                         "over 4 minutes before its first step)")
    ap.add_argument("--samples", type=int, default=None, help="calibration windows to use (default: all of the work folder's)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peer_eval import calibration, finish

    torch.manual_seed(0)
    calib = calibration(args.work)[: args.samples]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    layers = {name: m.weight.numel() for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")}
    saved = args.out / "model"
    t0 = time.perf_counter()
    ar = AutoRound(model, tokenizer, scheme="W4A16", bits=args.bits, group_size=args.group, sym=not args.asym,
                   dataset=[w[None] for w in calib], nsamples=int(calib.shape[0]), seqlen=int(calib.shape[1]),
                   iters=args.iters, lr=args.lr, enable_torch_compile=args.compile, device_map="cpu", seed=42)
    ar.quantize_and_save(str(saved), format="auto_round")
    seconds = time.perf_counter() - t0
    del ar, model
    found = sorted(p.parent for p in saved.rglob("config.json"))
    if len(found) != 1:
        raise RuntimeError(f"expected one saved checkpoint under {saved}, found {[str(p) for p in found]}")
    checkpoint = found[0]  # auto-round writes into a subfolder named after the model and scheme

    bpw = checkpoint_bpw(checkpoint, layers)
    quant_config = json.loads((checkpoint / "config.json").read_text()).get("quantization_config", {})
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), device_map="cpu", dtype=torch.float32).eval()
    backends = sorted({type(m).__module__ + "." + type(m).__name__ for name, m in model.named_modules()
                       if name in layers})
    finish(args.out, model, args.work, tool="autoround", version=importlib.metadata.version("auto-round"),
           quantize_seconds=seconds, bpw=bpw, saved=saved,
           settings={"scheme": "W4A16", "bits": args.bits, "group_size": args.group, "sym": not args.asym,
                     "iters": args.iters, "lr": args.lr or (f"1/{args.iters}" if args.iters else None),
                     "compile": args.compile, "samples": int(calib.shape[0]), "seq_len": int(calib.shape[1]),
                     "format": "auto_round", "backend": backends,
                     "eval_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                     "quantization_config": {k: quant_config.get(k) for k in
                                             ("bits", "group_size", "sym", "packing_format", "iters")}})


if __name__ == "__main__":
    from _main import run

    run(main)
