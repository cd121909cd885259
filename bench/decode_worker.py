"""One decode measurement in a fresh process: load one model version, time greedy decoding.

    python bench/decode_worker.py --variant lowbit --folder DIR --prompt-ids 1,2,3 --new-tokens 128

Runs under the system Python for fp32/bf16/lowbit and under torchao's venv for torchao, so it
imports nothing from lowbit at the top. Prints one JSON line: tokens/s (median of ``--repeats``
timed ``generate`` calls after a warm-up), resident memory the model holds, peak RSS (VmHWM), the bytes of the model's tensors, and the
generated ids (so the report can say whether versions agree). Resident memory is read after
decoding (every weight page touched, freed heap returned with ``malloc_trim``) minus VmRSS
before loading.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def tensor_bytes(model) -> int:
    """Bytes of parameters and buffers, each storage once (tensor subclasses: their inner tensors)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        inner = [t]
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            inner = [getattr(t, n) for n in names if getattr(t, n) is not None]
        for x in inner:
            key = (x.untyped_storage().data_ptr(), x.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += x.untyped_storage().nbytes()
    return total


def load(variant: str, folder: str):
    from transformers import AutoModelForCausalLM

    if variant in ("fp32", "bf16"):
        dtype = torch.float32 if variant == "fp32" else torch.bfloat16
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    if variant == "lowbit":
        import lowbit

        return lowbit.load(folder).eval()
    if variant.startswith("torchao"):
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        bits = 4 if variant == "torchao-int4" else 8
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.bfloat16 if bits == 4 else torch.float32).eval()
        if bits == 4:
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

            config = PrototypeInt4WeightOnlyConfig(group_size=64)
        else:
            config = Int8WeightOnlyConfig()
        quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn.startswith("model.layers."))
        return model
    raise SystemExit(f"unknown variant {variant}")


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", required=True)
    ap.add_argument("--folder", required=True)
    ap.add_argument("--prompt-ids", required=True)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    prompt = torch.tensor([[int(i) for i in args.prompt_ids.split(",")]])
    before = rss_mb()
    t0 = time.perf_counter()
    model = load(args.variant, args.folder)
    load_s = time.perf_counter() - t0
    after = rss_mb()
    kw = dict(do_sample=False, pad_token_id=0)
    model.generate(prompt, max_new_tokens=8, min_new_tokens=8, **kw)
    runs, out = [], None
    for _ in range(args.repeats):
        t = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kw)
        runs.append(time.perf_counter() - t)
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS shows what the model holds
    resident = rss_mb() - before
    made = out.shape[1] - prompt.shape[1]
    median = sorted(runs)[len(runs) // 2]
    kernels = {}
    try:
        from lowbit.nn import kernel_counts

        kernels = kernel_counts(model)
    except ImportError:
        pass
    print(json.dumps({"variant": args.variant, "tok_s": made / median, "runs_s": runs, "tokens": made,
                      "load_s": load_s, "resident_mb": resident, "after_load_mb": after - before, "peak_rss_mb": rss_mb("VmHWM"),
                      "tensor_mb": tensor_bytes(model) / 2**20, "kernels": kernels,
                      "ids": out[0, prompt.shape[1]:].tolist(), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
