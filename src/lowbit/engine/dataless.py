"""Run stages that need no calibration data: every targeted tensor solved on its own, in place."""
from __future__ import annotations

import time

from torch import nn
from tqdm.auto import tqdm

from lowbit.memory import HeapTrimmer, trim_heap
from lowbit.nn.reference import attach, qtensors
from lowbit.engine.report import RunReport, StageReport
from lowbit.errors import LowbitError
from lowbit.qtensor import matrix_view
from lowbit.quantizer import check_weight
from lowbit.engine.solve import Solved, refine_target, solve_target
from lowbit.recipe.plan import Pairs, refined_keys
from lowbit.recipe.recipe import Recipe


def run_data_free(model: nn.Module, recipe: Recipe, per_stage: list[Pairs], progress: bool = True,
                  keep: frozenset[str] | None = None) -> RunReport:
    """Apply each stage of ``recipe`` to its (target, scheme) pairs, in order; returns the report.

    Tied weights (lm_head = embeddings) are solved once and stay tied. ``keep``: keys whose float
    weight a later refining stage needs (default: those of ``recipe``'s own refining stages).
    """
    if keep is None:
        keep = refined_keys(recipe, per_stage)
    if not recipe.stages[0].modifier.refines:  # a refining stage run alone acts on quantized tensors
        check_pairs(model, [p for pairs in per_stage for p in pairs])  # refuse bad input before any change
    report = RunReport()
    trimmer = HeapTrimmer()
    t_run = time.perf_counter()
    early = _EarlyRefine()
    for k, (stage, pairs) in enumerate(zip(recipe.stages, per_stage)):
        m = stage.modifier
        sr = StageReport(m.name, m.options(), len(pairs))
        report.stages.append(sr)
        t0 = time.perf_counter()
        if m is not early.modifier:  # a refining stage that ran early was prepared then
            m.prepare(model)
        modules = dict(model.named_modules())
        if m.refines:
            sr.done += early.done + _refine_all(model, m, pairs, modules, report, progress, skip=early.keys)
            sr.seconds = time.perf_counter() - t0 + early.seconds
            early = _EarlyRefine()
            continue
        if k + 1 < len(recipe.stages) and recipe.stages[k + 1].modifier.refines:
            early = _EarlyRefine(recipe.stages[k + 1].modifier, dict((t.key, s) for t, s in per_stage[k + 1]))
            early.modifier.prepare(model)
        owners = _owners(model)
        for target, scheme in tqdm(pairs, desc=f"{m.name}", unit="tensor", disable=not progress):
            module = modules[target.module_name]
            w = getattr(module, target.param)
            if not isinstance(w, nn.Parameter):
                sr.done += 1  # a tied twin of a tensor solved earlier in this loop
                continue
            twins = [o for o in owners.get(id(w), []) if o != (module, target.param)]
            solved = solve_target(m, target, module, scheme, None, report, target.key in keep)
            if solved is None:
                continue
            sr.done += 1
            trimmer.solved(w.numel() * w.element_size())
            solved = early.refine(target, module, solved, report)
            if solved.qtensor is not None:
                weight = getattr(module, target.param)
                for owner, pname in twins:
                    attach(owner, pname, solved.qtensor, solved.dtype, weight)
        sr.seconds = time.perf_counter() - t0
    trim_heap()
    report.seconds = time.perf_counter() - t_run
    return report


class _EarlyRefine:
    """The refining stage (LoRC) that follows a quantizing stage, applied to each tensor right after
    that stage quantizes it, so that only one float copy is held at a time rather than every
    targeted weight's until the refining stage starts. The result is the same: in a data-free
    run each tensor's correction depends on that tensor alone."""

    def __init__(self, modifier=None, schemes: dict | None = None) -> None:
        self.modifier, self.schemes = modifier, schemes or {}
        self.keys: set[str] = set()
        self.done, self.seconds = 0, 0.0

    def refine(self, target, module: nn.Module, solved: Solved, report: RunReport) -> Solved:
        if solved.qtensor is None or target.key not in self.schemes:
            return solved
        t0 = time.perf_counter()
        refined = refine_target(self.modifier, target, module, self.schemes[target.key], report)
        self.keys.add(target.key)
        self.done += 1
        self.seconds += time.perf_counter() - t0
        return refined or solved


def _refine_all(model: nn.Module, m, pairs: Pairs, modules: dict, report: RunReport, progress: bool,
                skip: set[str] = frozenset()) -> int:
    """A refining stage (LoRC) over its pairs but ``skip`` (refined already); tied twins get the
    refined tensor too. Returns the count."""
    pairs = [(t, s) for t, s in pairs if t.key not in skip]
    if not pairs:
        return 0
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for pname, qt in qtensors(module).items():
            holders.setdefault(id(qt), []).append((module, pname))
    done = 0
    for target, scheme in tqdm(pairs, desc=f"{m.name}", unit="tensor", disable=not progress):
        module = modules[target.module_name]
        old = qtensors(module).get(target.param)
        solved = refine_target(m, target, module, scheme, report)
        done += 1
        if solved is None:
            continue
        weight = getattr(module, target.param)
        for owner, pname in holders.get(id(old), []):
            if (owner, pname) != (module, target.param):
                attach(owner, pname, solved.qtensor, solved.dtype, weight)
    return done


def check_pairs(model: nn.Module, pairs: Pairs) -> None:
    """Raise ``LowbitError`` for an already quantized tensor, non-finite weights or a bad granularity."""
    modules = dict(model.named_modules())
    for target, scheme in pairs:
        if target.quantized:
            raise LowbitError(f"{target.key} is already quantized; quantize the original model instead")
        w = getattr(modules[target.module_name], target.param)
        if scheme.weight is not None and w.device.type != "meta":  # streamed weights are checked when read
            m = matrix_view(w.detach(), target.layout)
            check_weight(m, scheme.weight, *m.shape, name=target.key)


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(parameter) -> every (module, name) that holds it; tied parameters have several."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((module, pname))
    return owners
