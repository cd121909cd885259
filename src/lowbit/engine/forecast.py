"""Forecast a calibration run's peak memory and time before it starts, and enforce ``--max-memory``.

Peak memory = what the process holds now (interpreter, torch, weights outside the blocks or the
whole model) + one block's weights twice (the original and the dequantized copy that replaces
each quantized layer), plus a float32 copy of them when a later stage corrects the quantized
weights (LoRC, bias correction) + what the methods hold for one block (each modifier's ``memory``: for
GPTQ one ``cols × cols`` Hessian per layer and the solver's working set, see
``lowbit.modifiers.gptq``) + two generations of hidden states (resident part; twice that when a
stage keeps the float model's hidden states too) + one batch's intermediate activations, plus
``HEADROOM`` of all that for what the parts leave out (allocator slack, temporaries of the
forward passes): the forecast must err high, since ``--max-memory`` trusts it.

Time = FLOPs at the rate this machine measures for a float32 matmul now: the engine's forwards
(two per block over the calibration tokens, three when a stage keeps float targets) plus each
stage's own work (its ``Modifier.flops``: GPTQ's Hessian products and updates, LSQ's training
steps), plus reading streamed weights at an assumed 300 MB/s. Both are estimates; the summary
prints the real figures next to them.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace

import torch

from lowbit.errors import LowbitError

GB = 1 << 30
#: share added for what the parts leave out; measured on SmolLM2's default GPTQ run (``lowbit quantize
#: smollm2-135m --scheme w4g128 --method gptq``, 128 windows × 512): its peak was 7% above the sum of
#: the parts (1.47 GB parts, 1.58 GB peak), so the forecast with this headroom, 1.69 GB, errs 7% high.
HEADROOM = 0.15
DISK_BYTES_PER_S = 300e6  # assumed read speed of streamed weights (a guess for a local SSD)


@dataclass(frozen=True)
class Shape:
    """What the forecast needs to know about a run."""

    resident_bytes: int  # RSS now
    block_bytes: int  # largest block's weights (bytes in their dtype)
    block_params: int
    blocks: int
    layers: tuple[tuple[int, int], ...]  # (rows, cols) of each quantized layer of the largest block
    hidden: int
    intermediate: int
    tokens: int  # samples × seq_len
    seq_len: int
    batch_tokens: int  # tokens per forward (batch size × seq_len)
    streamed_bytes: int  # bytes read from disk over the run (0 when the model is in memory)
    method_bytes: int = 0  # the largest ``Modifier.memory`` of the recipe's stages for one block
    method_flops: float = 0.0  # the recipe's stages' ``Modifier.flops`` for one block, summed
    float_generation: bool = False  # a stage keeps the float model's hidden states too
    kept_bytes: int = 0  # float copies of one block's weights kept for a later stage (LoRC, bias correction)


@dataclass(frozen=True)
class Forecast:
    peak_bytes: int
    parts: dict[str, int]
    seconds: float

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in self.parts.items())
        return f"forecast: peak memory ≈ {self.peak_bytes / GB:.2f} GB ({parts}), time ≈ {_duration(self.seconds)}"


def forecast(s: Shape, act_budget: int, flops_per_s: float) -> Forecast:
    """Peak bytes and seconds of a run of shape ``s`` keeping ``act_budget`` bytes of hidden states."""
    generations = 2 if s.float_generation else 1
    acts_total = 2 * s.tokens * s.hidden * 4 * generations
    parts = {
        "now": s.resident_bytes,
        "block": 2 * s.block_bytes + s.kept_bytes,
        "method": s.method_bytes,
        "activations": min(acts_total, act_budget * generations) + 6 * s.batch_tokens * max(s.intermediate, s.hidden) * 4,
    }
    parts["headroom"] = int(HEADROOM * sum(parts.values()))
    flops = s.blocks * ((2 + s.float_generation) * 2 * s.block_params * s.tokens + s.method_flops)
    seconds = flops / flops_per_s + s.streamed_bytes / DISK_BYTES_PER_S
    return Forecast(sum(parts.values()), parts, seconds)


def measure_flops() -> float:
    """float32 matmul FLOP/s of this machine right now (about 0.1 s)."""
    a = torch.randn(512, 1024)
    b = torch.randn(1024, 1024)
    a @ b
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < 0.1:
        a @ b
        n += 1
    return 2 * 512 * 1024 * 1024 * n / (time.perf_counter() - t0)


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    """This program's peak resident memory so far.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this program's own address
    space. ``ru_maxrss`` is not used there: it survives ``fork`` and ``execve``, so a program
    started by a large parent (a benchmark harness holding 5 GB) would report the parent's peak.
    Elsewhere ``ru_maxrss`` (bytes on macOS, KiB on the BSDs).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def parse_bytes(text: str) -> int:
    """'4GB', '4G', '3.5GiB', '800MB' -> bytes (GB = 2**30, as top and free report)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not m:
        raise LowbitError(f"--max-memory {text!r} is not a size; write it like 4GB, 3.5G or 800MB")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": GB, "T": 1 << 40}[m.group(2)])


def fit(s: Shape, max_bytes: int | None, act_budget: int, flops_per_s: float, streamed: bool
        ) -> tuple[Forecast, int, int]:
    """The forecast, activation budget and batch size (samples) to run with under ``max_bytes``.

    Tries the requested budget first, then hidden states on disk, then one sample per forward;
    raises ``LowbitError`` saying what would fit when even that does not.
    """
    for budget, batch_tokens in ((act_budget, s.batch_tokens), (0, s.batch_tokens), (0, s.seq_len)):
        f = forecast(replace(s, batch_tokens=batch_tokens), budget, flops_per_s)
        if max_bytes is None or f.peak_bytes <= max_bytes:
            return f, budget, max(1, batch_tokens // s.seq_len)
    hint = "" if streamed else "; load the model from a safetensors folder so its blocks stream from disk"
    raise LowbitError(f"this run needs about {f.peak_bytes / GB:.2f} GB even with hidden states on disk and one "
                      f"sample per forward, more than --max-memory {max_bytes / GB:.2f} GB ({f.describe()}); "
                      f"raise --max-memory to {f.peak_bytes / GB:.1f}GB or use fewer --samples / a shorter "
                      f"--seq-len{hint}")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
