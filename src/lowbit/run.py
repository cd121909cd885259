"""The sequential calibration runner: one block at a time, in bounded memory, resumable.

``calibrate(model, plan, algorithm, batches)`` quantizes, in place, every tensor the plan selects:

1. catch what the first repeated block receives for every calibration batch (``capture``);
2. for each block: bring its weights in (``stream``), run it on its inputs while ``observe``
   accumulates each layer's statistics, solve every layer with the algorithm, put the
   quantized weights in (``apply.attach``), run the quantized block again to get the next
   block's inputs, checkpoint (``checkpoint``), and let the weights go;
3. tensors outside the blocks, experts that saw no token, and convolutions are rounded to
   nearest, and the report says so.

The algorithm is any object with ``new_stats(cols)`` and ``solve(W, stats, spec, global_scale)``
returning ``codes, scale, zero, info`` (see ``algorithms``); it never sees the model.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.activations import Generation, nbytes
from lowbit.apply import attach
from lowbit.capture import catch_inputs, check_uniform_layers, find_blocks
from lowbit.checkpoint import RunDir, read_block
from lowbit.errors import LowbitError
from lowbit.observe import eager_experts, observe
from lowbit.plan import Target, resolve_targets
from lowbit.qtensor import QuantizedTensor, matrix_view
from lowbit.quantizer import check_weight, pack_matrix, quantize_matrix, quantize_weight
from lowbit.scheme import Rule
from lowbit.spec import QuantSpec, tile_of


@dataclass
class RunReport:
    """What a calibration run did, for the summary table."""

    blocks: int = 0
    layers: list[dict[str, Any]] = field(default_factory=list)  # key, damp, loss, tokens, seconds
    fallbacks: list[str] = field(default_factory=list)  # "<key>: why it was rounded to nearest"
    resumed_from: int = 0
    seconds: float = 0.0


@dataclass
class Streaming:
    """Weights that live on disk: ``load(module, prefix)`` fills a block, ``release(module)`` empties it."""

    load: Any
    release: Any


def calibrate(model: nn.Module, plan: list[Rule], algorithm: Any, batches: list[Tensor], *,
              workdir: Path | None = None, resume: bool = False, fingerprint: str = "",
              streaming: Streaming | None = None, act_budget: int = 1 << 30, progress: bool = True) -> RunReport:
    """Quantize ``model`` in place, block by block, with a calibrated ``algorithm``.

    batches:   model inputs, e.g. (B, T) int64 token windows (all on the model's device).
    workdir:   checkpoint folder (``checkpoint.RunDir``); None keeps nothing on disk.
    streaming: set when the blocks' weights are on the meta device and come from disk.
    act_budget: bytes of hidden states kept in memory per generation; the rest spill to ``workdir``.
    """
    t0 = time.perf_counter()
    report = RunReport()
    found = find_blocks(model)
    blocks = list(found[1]) if found else [model]
    prefix = f"{found[0]}." if found else ""
    pairs = resolve_targets(model, plan)
    for target, _ in pairs:
        if target.quantized:
            raise LowbitError(f"{target.key} is already quantized; quantize the original model instead")
    per_block = _split(pairs, prefix if found else None, len(blocks))
    outside = per_block.pop(-1)
    check_uniform_layers(model)
    run = RunDir(workdir, fingerprint, resume, batch=len(batches[0]) if batches else None) \
        if workdir is not None else None
    start = run.done if run else 0
    report.resumed_from, report.blocks = start, len(blocks)
    _round_outside(model, outside, report)
    with eager_experts(model):
        calls = catch_inputs(model, blocks[0] if found else None, batches)
        hidden = _first_generation(calls, run, start, act_budget)
        for i in range(start):
            _restore_block(model, run, i, report, streaming)
        bar = tqdm(range(start, len(blocks)), desc=f"calibrate ({_name(algorithm)})", unit="block",
                   disable=not progress, initial=start, total=len(blocks))
        for i in bar:
            name = f"{prefix}{i}" if found else ""
            if streaming:
                streaming.load(blocks[i], f"{name}." if name else "")
            entries = _quantize_block(model, blocks[i], calls, hidden, per_block.get(i, []), algorithm, report)
            folder = run.acts(i) if run else None
            hidden = _propagate(blocks[i], calls, hidden, Generation(folder, act_budget // 2))
            if run:
                run.save_block(i, *_block_payload(entries, report))
                run.mark_done(i)
            if streaming:
                streaming.release(blocks[i])
            _trim_heap()
    report.seconds = time.perf_counter() - t0
    return report


def _name(algorithm: Any) -> str:
    return getattr(algorithm, "name", type(algorithm).__name__.lower())


def _split(pairs: list[tuple[Target, QuantSpec]], prefix: str | None, n: int) -> dict[int, list]:
    """Targets per block index; key -1 holds those outside the blocks."""
    out: dict[int, list] = {-1: []}
    for target, spec in pairs:
        index = -1
        if prefix is None:
            index = 0
        elif target.key.startswith(prefix):
            head = target.key[len(prefix):].split(".", 1)[0]
            index = int(head) if head.isdigit() and int(head) < n else -1
        out.setdefault(index, []).append((target, spec))
    return out


def _round_outside(model: nn.Module, pairs: list, report: RunReport) -> None:
    from lowbit.apply import quantize_model

    if not pairs:
        return
    rules = [Rule(f"^{re.escape(t.key)}$", spec) for t, spec in pairs]
    quantize_model(model, rules, method="rtn", progress=False)
    report.fallbacks += [f"{t.key}: outside the repeated blocks, rounded to nearest" for t, _ in pairs]


def _first_generation(calls: list, run: RunDir | None, start: int, budget: int) -> Generation:
    """The hidden states entering block ``start``: caught from the model, or reloaded on resume."""
    if run is not None and start > 0:
        return Generation.load(run.acts(start - 1), budget // 2)
    total = sum(nbytes(c.hidden) for c in calls)
    folder = run.path / "acts-input" if run is not None and total > budget // 2 else None
    gen = Generation(folder, budget // 2)
    for c in calls:
        gen.append(c.hidden)
    _drop_hidden(calls)
    return gen.finish()


def _drop_hidden(calls: list) -> None:
    """Forget the caught hidden states (the generation owns them now)."""
    for c in calls:
        if c.hidden_kw:
            c.kwargs[c.hidden_kw] = None
        else:
            c.args = (None, *c.args[1:])


def _quantize_block(model: nn.Module, block: nn.Module, calls: list, hidden: Generation, pairs: list,
                    algorithm: Any, report: RunReport) -> list[tuple[Target, QuantizedTensor, torch.dtype]]:
    """Statistics pass over the block's inputs, then one solve per tensor; returns what was attached."""
    modules = dict(model.named_modules())
    watched = [(t.key, modules[t.module_name], t.param, t.kind) for t, _ in pairs]
    with torch.no_grad(), observe(watched, algorithm.new_stats) as seen:
        for j, call in enumerate(calls):
            call.run(block, hidden[j])
            seen.reset()
    entries = []
    last_use = {id(seen.layers[t.key]): t.key for t, _ in pairs if t.key in seen.layers}
    for target, spec in pairs:
        module = modules[target.module_name]
        w = getattr(module, target.param)
        if target.kind == "experts":
            qt = _solve_experts(target, w, spec, seen.experts.get(target.key, {}), algorithm, report)
        elif target.key in seen.layers:
            qt = _solve(target, w, spec, seen.layers[target.key], algorithm, report)
            if last_use.get(id(seen.layers[target.key])) == target.key:
                seen.layers[target.key].__dict__.clear()  # its statistics are no longer needed
        else:
            qt = quantize_weight(w, spec, target.layout, target.key)  # checks the weight too
            report.fallbacks.append(f"{target.key}: no calibration inputs ({target.kind}), rounded to nearest")
        attach(module, target.param, qt, w.dtype)
        entries.append((target, qt, w.dtype))
    return entries


def _solve(target: Target, w: Tensor, spec: QuantSpec, stats: Any, algorithm: Any,
           report: RunReport) -> QuantizedTensor:
    m = matrix_view(w.detach().to(torch.float32), target.layout)  # (rows, cols)
    check_weight(m, spec, *m.shape, target.key)
    gscale = spec.format.global_scale(m)
    t0 = time.perf_counter()
    codes, scale, zero, info = algorithm.solve(m, stats, spec, gscale)
    report.layers.append({"key": target.key, **info, "seconds": round(time.perf_counter() - t0, 3)})
    return pack_matrix(spec, tuple(w.shape), target.layout, codes, scale, zero, gscale)


def _solve_experts(target: Target, w: Tensor, spec: QuantSpec, stats: dict[int, Any], algorithm: Any,
                   report: RunReport) -> QuantizedTensor:
    """Fused experts (E, out, in): each expert solved with its own statistics, then stacked."""
    full = matrix_view(w.detach().to(torch.float32), "experts")  # (E*out, in)
    check_weight(full, spec, *full.shape, target.key)
    n_exp, out = w.shape[0], w.shape[1]
    tr, _ = tile_of(spec.granularity, *full.shape)
    if out % tr:
        raise LowbitError(f"{target.key}: tiles of {tr} rows straddle experts of {out} rows; "
                          "use per-channel or per-group quantization for fused experts")
    gscale = spec.format.global_scale(full)
    parts, idle = [], []
    for e in range(n_exp):
        m = full[e * out:(e + 1) * out]  # (out, in)
        if e in stats:
            codes, scale, zero, info = algorithm.solve(m, stats[e], spec, gscale)
            report.layers.append({"key": f"{target.key}[{e}]", **info})
        else:
            codes, scale, zero = quantize_matrix(m, spec, gscale)
            idle.append(e)
        parts.append((codes, scale, zero))
    if idle:
        report.fallbacks.append(f"{target.key}: experts {idle} saw no calibration token, rounded to nearest")
    codes = torch.cat([p[0] for p in parts])
    scale = torch.cat([p[1] for p in parts])
    zero = None if parts[0][2] is None else torch.cat([p[2] for p in parts])
    return pack_matrix(spec, tuple(w.shape), "experts", codes, scale, zero, gscale)


def _propagate(block: nn.Module, calls: list, hidden: Generation, out: Generation) -> Generation:
    """Run the (now quantized) block on every batch; its outputs are the next block's inputs."""
    with torch.no_grad():
        for j, call in enumerate(calls):
            out.append(call.run(block, hidden[j]))
    hidden.memory.clear()  # its files, if any, are removed by the checkpoint once this block is recorded
    return out.finish()


def _block_payload(entries: list, report: RunReport) -> tuple[dict, dict]:
    tensors, meta = {}, {}
    for target, qt, dtype in entries:
        key = f"{target.module_name}.{target.param}"  # as io.save names it
        for role, t in qt.to_tensors().items():
            tensors[f"{key}.{role}"] = t
        meta[key] = {**qt.meta(), "dtype": str(dtype).removeprefix("torch.")}
    keys = {t.key for t, _, _ in entries}
    layers = [r for r in report.layers if r["key"].split("[")[0] in keys]
    fallbacks = [f for f in report.fallbacks if f.split(":")[0] in keys]
    return tensors, {"tensors": meta, "layers": layers, "fallbacks": fallbacks}


def _restore_block(model: nn.Module, run: RunDir, i: int, report: RunReport, streaming: Streaming | None) -> None:
    """Take a finished block's report from its checkpoint, and its tensors unless they stream (resume)."""
    _, meta = run.load_block(i)
    report.layers += meta["layers"]
    report.fallbacks += meta["fallbacks"]
    if streaming is None:
        restore_block(model, run.path, i)


def restore_block(model: nn.Module, folder: Path, i: int) -> None:
    """Attach block ``i``'s quantized tensors from the checkpoint ``folder`` to ``model``."""
    tensors, meta = read_block(folder, i)
    modules = dict(model.named_modules())
    for key, m in meta["tensors"].items():
        module_name, _, param = key.rpartition(".")
        parts = {r: tensors[f"{key}.{r}"] for r in ("codes", "scale", "zero", "global_scale")
                 if f"{key}.{r}" in tensors}
        attach(modules[module_name], param, QuantizedTensor.from_tensors(m, parts), getattr(torch, m["dtype"]))


def _trim_heap() -> None:
    """Give freed heap memory back to the OS after a block (glibc keeps it otherwise, and a
    long run's resident memory creeps up by fragmentation). A no-op where glibc is absent."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass
