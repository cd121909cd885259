"""The sequential engine: one block at a time, in bounded memory, resumable.

``calibrate(model, plan, recipe, batches)`` applies a recipe that needs calibration data:

1. catch what the first repeated block receives for every calibration batch (``capture``);
2. for each block: bring its weights in (``weights``); when a stage asks for float targets,
   run the untouched block on the float model's inputs first (``fp_out``); then, stage after
   stage, let the modifier solve the whole block (``solve_block``) and/or gather each targeted
   layer's statistics on the quantized model's inputs (``observe``) and solve every layer
   (``solve_layer``); run the finished block again to get the next block's inputs; checkpoint
   (``checkpoint``); let the weights go;
3. tensors outside the blocks are solved without data where the method can, else rounded to
   nearest, and the report says so.

Data-free stages in a recipe that needs data run inside the same pass, so each block is read
from disk once.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.engine.activations import Generation, nbytes
from lowbit.engine.capture import catch_inputs
from lowbit.engine.checkpoint import RunDir
from lowbit.engine.dataless import check_pairs, run_data_free
from lowbit.engine.observe import ObservedAll, eager_experts, observe, stop_early
from lowbit.engine.report import RunReport, StageReport
from lowbit.engine.restore import block_payload, restore_block, restore_report
from lowbit.engine.solve import refine_target, solve_target
from lowbit.memory import trim_heap
from lowbit.nn.reference import drop_floats, keep_float, kept_float, qtensors
from lowbit.qtensor import matrix_view
from lowbit.models.blocks import check_uniform_layers, find_blocks
from lowbit.modifiers import make
from lowbit.modifiers.base import BlockData, Modifier
from lowbit.recipe.plan import Pairs, plan_recipe, refined_keys
from lowbit.recipe.recipe import Recipe, Stage
from lowbit.scheme import Rule


class Streaming:
    """Weights that live on disk: ``load(module, prefix)`` fills a block, ``release(module)`` empties it."""

    def __init__(self, load: Any, release: Any) -> None:
        self.load, self.release = load, release


def calibrate(model: nn.Module, plan: list[Rule], method: Recipe | Modifier | str, batches: list[Tensor], *,
              workdir: Path | None = None, resume: bool = False, fingerprint: str = "",
              streaming: Streaming | None = None, act_budget: int = 1 << 30, progress: bool = True) -> RunReport:
    """Apply ``method`` (a recipe, one modifier or ``"a+b"``) to ``model`` in place, block by block.

    batches:   model inputs, e.g. (B, T) int64 token windows (all on the model's device).
    workdir:   checkpoint folder (``checkpoint.RunDir``); None keeps nothing on disk.
    streaming: set when the blocks' weights are on the meta device and come from disk.
    act_budget: bytes of hidden states kept in memory per generation; the rest spill to ``workdir``.
    """
    recipe = Recipe.of(method)
    t0 = time.perf_counter()
    per_stage = plan_recipe(model, recipe, plan, batches, progress)
    check_pairs(model, [p for pairs in per_stage for p in pairs])
    found = find_blocks(model)
    blocks = list(found[1]) if found else [model]
    prefix = f"{found[0]}." if found else ""
    check_uniform_layers(model)
    report = RunReport(blocks=len(blocks), stages=[StageReport(s.modifier.name, s.modifier.options(), len(p))
                                                   for s, p in zip(recipe.stages, per_stage)])
    split = [_split(pairs, prefix if found else None, len(blocks)) for pairs in per_stage]
    keep = refined_keys(recipe, per_stage)
    _solve_outside(model, recipe, [s.pop(-1) for s in split], report, keep)
    run = RunDir(workdir, fingerprint, resume, batch=len(batches[0]) if batches else None) \
        if workdir is not None else None
    start = run.done if run else 0
    report.resumed_from = start
    float_gen = recipe.float_targets
    saves_float = any(s.modifier.changes_float for s in recipe.stages)
    for i in range(start):
        restore_report(report, run, i)
        if streaming is None:
            restore_block(model, run.path, i)
    with eager_experts(model):
        calls = catch_inputs(model, blocks[0] if found else None, batches)
        q_in, fp_in = _first_generations(calls, run, start, act_budget, float_gen)
        bar = tqdm(range(start, len(blocks)), desc=f"calibrate ({recipe.name})", unit="block",
                   disable=not progress, initial=start, total=len(blocks))
        for i in bar:
            name = f"{prefix}{i}" if found else ""
            if streaming:
                streaming.load(blocks[i], f"{name}." if name else "")
            fp_out = _propagate(blocks[i], calls, fp_in, _gen(run, i, "fp", act_budget)) if float_gen else None
            counts = []
            for k, (stage, parts) in enumerate(zip(recipe.stages, split)):
                data = BlockData(calls, q_in, fp_in, fp_out) if stage.modifier.has_block_solve else None
                floats = _snapshot(model, parts.get(i, []), keep) if data is not None else []
                done = _run_stage(model, blocks[i], stage, report.stages[k], parts.get(i, []), calls, q_in, data,
                                  report, keep)
                layered = stage.modifier.has_layer_solve or stage.modifier.refines
                counts.append(len(done) if layered else len(parts.get(i, [])))
                _keep_snapshot(floats)
            drop_floats(blocks[i])
            old = q_in
            q_in = _propagate(blocks[i], calls, q_in, _gen(run, i, "q", act_budget))
            for gen in {id(g): g for g in (old, fp_in) if g is not None}.values():
                gen.memory.clear()  # its files, if any, are removed by the checkpoint once this block is recorded
            fp_in = fp_out
            if run:
                run.save_block(i, *block_payload(blocks[i], f"{name}." if name else "", counts, report, saves_float))
                run.mark_done(i)
            if streaming:
                streaming.release(blocks[i])
            trim_heap()  # the block's temporaries, and the float weights it replaced
    drop_floats(model)  # what tensors outside the blocks kept for a later stage
    report.seconds = time.perf_counter() - t0
    return report


def _run_stage(model: nn.Module, block: nn.Module, stage: Stage, sr: StageReport, pairs: Pairs, calls: list,
               q_in: Generation, data: BlockData | None, report: RunReport, keep: frozenset[str] = frozenset()) -> list:
    """One stage on one block: block solve, statistics pass, layer solves (or refinements of what an
    earlier stage quantized); returns what it solved. ``keep``: keys whose float weight a later
    stage refines."""
    m = stage.modifier
    t0 = time.perf_counter()
    modules = dict(model.named_modules())
    if m.refines:
        solved = [s for t, sc in pairs if (s := refine_target(m, t, modules[t.module_name], sc, report)) is not None]
        sr.done += len(solved)
        sr.seconds += time.perf_counter() - t0
        return solved
    if data is not None:
        data.layers = [(t.key, modules[t.module_name], t.param, s) for t, s in pairs]
        info = m.solve_block(block, data) or {}
        if info:
            sr.blocks.append(info)
        _block_lines(m, pairs, info, report)
    solved = []
    if m.has_layer_solve and pairs:
        seen = _statistics(m, block, calls, q_in, pairs, modules) if _has_stats(m) else None
        for target, scheme in pairs:
            stats = None
            if seen is not None:
                stats = seen.experts.get(target.key, {}) if target.kind == "experts" else seen.layers.get(target.key)
                if stats is None:
                    _fallback(model, target, scheme, report, f"no calibration inputs ({target.kind})",
                              target.key in keep)
                    continue
            s = solve_target(m, target, modules[target.module_name], scheme, stats, report, target.key in keep)
            if s is not None:
                solved.append(s)
                sr.done += 1
            if seen is not None and target.key in seen.layers and _last_use(seen, pairs, target.key):
                seen.layers[target.key].__dict__.clear()  # its statistics are no longer needed
    elif data is not None:
        sr.done += len(pairs)
    sr.seconds += time.perf_counter() - t0
    return solved


def _snapshot(model: nn.Module, pairs: Pairs, keep: frozenset[str]) -> list[tuple[nn.Module, str, Tensor]]:
    """(module, param, float32 matrix view) of a block solve's tensors in ``keep`` that no stage has
    quantized yet, copied just before the stage runs (after any earlier stage changed them, e.g.
    SmoothQuant's folding); a layer solve keeps the matrix it quantized itself (``engine.solve``)."""
    modules = dict(model.named_modules())
    out, seen = [], set()
    for t, _ in pairs:
        module = modules[t.module_name]
        if t.key in keep and t.key not in seen and t.param not in qtensors(module):
            seen.add(t.key)
            w = getattr(module, t.param).detach().to(torch.float32)
            out.append((module, t.param, matrix_view(w, t.layout).clone()))
    return out


def _keep_snapshot(floats: list[tuple[nn.Module, str, Tensor]]) -> None:
    """After a stage: keep the copied float weight beside each tensor it quantized (a block solve
    attaches its results itself; a layer solve keeps its own, see ``engine.solve``)."""
    for module, param, W in floats:
        if param in qtensors(module) and kept_float(module, param) is None:
            keep_float(module, param, W)


def _block_lines(m: Modifier, pairs: Pairs, info: dict, report: RunReport) -> None:
    """A block solve's report lines, from the keys its report lists: a layer record for each of
    ``layers`` (what it solved), a fallback line for each of ``rounded_to_nearest``."""
    kinds = {t.key: t.kind for t, _ in pairs}
    for key in info.get("layers", ()):
        report.layers.append({"key": key, "method": m.name, "solve": "block"})
    for key in info.get("rounded_to_nearest", ()):
        report.fallbacks.append(f"{key}: {m.name} does not solve it ({kinds.get(key, 'tensor')}), rounded to nearest")


def _has_stats(m: Modifier) -> bool:
    return type(m).new_stats is not Modifier.new_stats


def _statistics(m: Modifier, block: nn.Module, calls: list, q_in: Generation, pairs: Pairs, modules: dict):
    """One pass of the block over the quantized model's inputs, accumulating each layer's statistics."""
    watched = [(t.key, modules[t.module_name], t.param, t.kind) for t, _ in pairs]
    with torch.no_grad(), observe(watched, m.new_stats) as seen, stop_early(watched) as next_forward:
        for j, call in enumerate(calls):
            try:
                call.run(block, q_in[j])
            except ObservedAll:
                pass  # every layer has its input; the rest of the block's output is not needed
            seen.reset()
            next_forward()
    return seen


def _last_use(seen: Any, pairs: Pairs, key: str) -> bool:
    """Whether ``key`` is the last of the layers sharing its accumulator (q/k/v share one)."""
    obj = seen.layers[key]
    last = [t.key for t, _ in pairs if seen.layers.get(t.key) is obj]
    return bool(last) and last[-1] == key


def _fallback(model: nn.Module, target: Any, scheme: Any, report: RunReport, why: str, keep: bool = False) -> None:
    """Round a tensor the method cannot solve to nearest (weight specs) and say so; ``keep``: keep
    its float weight for a later refining stage."""
    if scheme.weight is None:
        report.fallbacks.append(f"{target.key}: {why}, left as it is")
        return
    modules = dict(model.named_modules())
    solve_target(make("rtn"), target, modules[target.module_name], scheme, None, report, keep)
    report.fallbacks.append(f"{target.key}: {why}, rounded to nearest")


def _solve_outside(model: nn.Module, recipe: Recipe, outside: list[Pairs], report: RunReport,
                   keep: frozenset[str] = frozenset()) -> None:
    """Tensors outside the blocks: data-free stages solve them; a data stage hands them to its
    data-free method (``Modifier.outside``) if it has one, else rounds them to nearest."""
    for stage, pairs in zip(recipe.stages, outside):
        if not pairs:
            continue
        alone = stage.modifier.outside() if stage.modifier.needs_data else stage.modifier
        if alone is not None:
            sub = run_data_free(model, Recipe((replace(stage, modifier=alone),)), [pairs], progress=False, keep=keep)
            report.layers += sub.layers
            if alone is not stage.modifier:
                report.fallbacks += [f"{t.key}: outside the repeated blocks, solved by {stage.modifier.name}'s "
                                     "data-free method" for t, _ in pairs]
            continue
        modules = dict(model.named_modules())
        for target, scheme in pairs:
            if target.param in qtensors(modules[target.module_name]):  # an earlier stage quantized it already
                report.fallbacks.append(f"{target.key}: outside the repeated blocks, {stage.modifier.name} "
                                        "left it as the earlier stage made it")
                continue
            _fallback(model, target, scheme, report, "outside the repeated blocks", target.key in keep)


def _split(pairs: Pairs, prefix: str | None, n: int) -> dict[int, Pairs]:
    """Pairs per block index; key -1 holds those outside the blocks."""
    out: dict[int, Pairs] = {-1: []}
    for target, scheme in pairs:
        index = -1
        if prefix is None:
            index = 0
        elif target.key.startswith(prefix):
            head = target.key[len(prefix):].split(".", 1)[0]
            index = int(head) if head.isdigit() and int(head) < n else -1
        out.setdefault(index, []).append((target, scheme))
    return out


def _gen(run: RunDir | None, i: int, kind: str, budget: int) -> Generation:
    folder = (run.acts(i) if kind == "q" else run.fp_acts(i)) if run else None
    return Generation(folder, budget // (4 if kind == "fp" else 2))


def _first_generations(calls: list, run: RunDir | None, start: int, budget: int, float_gen: bool
                       ) -> tuple[Generation, Generation | None]:
    """The hidden states entering block ``start`` (quantized, and float when kept)."""
    if run is not None and start > 0:
        q = Generation.load(run.acts(start - 1), budget // 2)
        return q, Generation.load(run.fp_acts(start - 1), budget // 4) if float_gen else None
    total = sum(nbytes(c.hidden) for c in calls)
    folder = run.path / "acts-input" if run is not None and total > budget // 2 else None
    gen = Generation(folder, budget // 2)
    for c in calls:
        gen.append(c.hidden)
    _drop_hidden(calls)
    gen.finish()
    return gen, gen if float_gen else None  # both models see the same inputs at the first block


def _drop_hidden(calls: list) -> None:
    """Forget the caught hidden states (the generation owns them now)."""
    for c in calls:
        if c.hidden_kw:
            c.kwargs[c.hidden_kw] = None
        else:
            c.args = (None, *c.args[1:])


def _propagate(block: nn.Module, calls: list, hidden: Generation, out: Generation) -> Generation:
    """Run the block on every batch; its outputs are the next block's inputs."""
    with torch.no_grad():
        for j, call in enumerate(calls):
            out.append(call.run(block, hidden[j]))
    return out.finish()
