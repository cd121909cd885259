"""Which tensors each stage of a recipe acts on, and the checks that refuse a bad recipe early.

The run's plan (``lowbit.models.targets``: rules from the ``--scheme``) says what every tensor
becomes. A stage acts on the plan's tensors whose key its ``targets`` regex finds, with its own
``scheme`` when it gives one. A stage acts on a tensor only if the tensor's scheme has what the
method ``requires`` (a sparsity spec for a pruning method, a weight spec for a quantizer).
"""
from __future__ import annotations

import re
from dataclasses import replace

from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.targets import Target, resolve_schemes, targets
from lowbit.qtensor import matrix_shape
from lowbit.recipe.recipe import Recipe, Stage
from lowbit.scheme import Rule, TensorScheme

Pairs = list[tuple[Target, TensorScheme]]
_PART_WORDS = {"weight": "a weight spec", "input": "an activation spec (+a=...)", "sparsity": "a sparsity spec (+s=...)"}


def plan_recipe(model: nn.Module, recipe: Recipe, rules: list[Rule], batches: list | None = None,
                progress: bool = True) -> list[Pairs]:
    """Per stage, its pairs; raises ``LowbitError`` for a recipe that cannot do what it says.

    batches: the run's calibration batches, for a stage whose allocation measures (``allocate``).
    """
    all_pairs = resolve_schemes(model, rules)
    if not all_pairs:
        done = [t.key for t in targets(model) if t.quantized] + [n for n, m in model.named_modules()
                                                                 if hasattr(m, "qtensor")]
        if done:
            raise LowbitError(f"this model is already quantized ({len(done)} tensors, e.g. {done[0]}), so 0 tensors "
                              "would be quantized; quantize the original model instead")
        raise LowbitError("the scheme selects no tensor of this model; nothing would be compressed")
    out = []
    for i, stage in enumerate(recipe.stages):
        m = stage.modifier
        where = f"stage {i + 1} ({m.name})"
        candidates = stage_candidates(stage, all_pairs)
        if not candidates:
            raise LowbitError(f"{where}: targets {stage.targets!r} match no tensor the scheme selects; "
                              f"tensors look like {all_pairs[0][0].key}")
        pairs = [(t, s) for t, s in candidates if _has(s, m.requires)]
        if not pairs:
            need = " and ".join(_PART_WORDS[p] for p in sorted(m.requires))
            raise LowbitError(f"{where}: method {m.name} needs {need} in the scheme, which "
                              f"{_describe(candidates[0][1])} does not have")
        kinds = m.solves_kinds
        for scheme in dict.fromkeys(s for t, s in pairs if kinds is None or t.kind in kinds):
            try:
                m.check_scheme(scheme)
            except LowbitError as e:
                raise LowbitError(f"{where}: {e}") from None
        _check_nm(model, pairs, where)
        if "sparsity" in m.produces:
            _check_untied(model, pairs, where)
        out.append(pairs)
    _leave_weight_to_later(recipe, out)
    _check_refined(recipe, out)
    _check_produced(recipe, out)
    return [stage.modifier.allocate(model, pairs, batches, progress) for stage, pairs in zip(recipe.stages, out)]


def _check_nm(model: nn.Module, pairs: Pairs, where: str) -> None:
    """An N:M sparsity needs every targeted matrix's input width to be a multiple of M."""
    params = None
    for t, s in pairs:
        sp = s.sparsity
        if sp is None or sp.kind != "nm":
            continue
        params = params if params is not None else dict(model.named_parameters(remove_duplicate=False))
        w = params.get(f"{t.module_name}.{t.param}" if t.module_name else t.param)
        cols = None if w is None else matrix_shape(tuple(w.shape), t.layout)[1]
        if cols is not None and cols % sp.m:
            raise LowbitError(f"{where}: N:M sparsity {sp.n}:{sp.m} needs input widths that are multiples of {sp.m}, "
                              f"but {t.key} has {cols} inputs; leave it out (--targets / a rule) or use unstructured "
                              "sparsity such as s=50%")


def _check_untied(model: nn.Module, pairs: Pairs, where: str) -> None:
    """A pruning stage refuses a tensor tied to another (lm_head sharing the embeddings): zeroing it
    would remove rows of the embedding table too."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for t, s in pairs:
        if s.sparsity is None:
            continue
        w = getattr(model.get_submodule(t.module_name), t.param, None)
        twins = names.get(id(w), [])
        if len(twins) > 1:
            raise LowbitError(f"{where}: {t.key} is tied to {', '.join(n for n in twins if not n.startswith(t.key))} "
                              "(one tensor): pruning it would prune the embedding table too; leave it out of the "
                              "pruning stage (targets) or untie the embeddings first")


def _leave_weight_to_later(recipe: Recipe, per_stage: list[Pairs]) -> None:
    """A stage that prunes and could quantize too (sparsegpt) only prunes the tensors that a later
    stage quantizes (``sparsegpt+gptq``): the weight is that stage's, which keeps the mask."""
    for k, stage in enumerate(recipe.stages):
        if not {"weight", "sparsity"} <= stage.modifier.produces:
            continue
        later = {t.key for st, pairs in zip(recipe.stages[k + 1:], per_stage[k + 1:])
                 if "weight" in st.modifier.produces for t, _ in pairs}
        per_stage[k] = [(t, replace(s, weight=None, input=None) if t.key in later and s.weight is not None else s)
                        for t, s in per_stage[k]]


def refined_keys(recipe: Recipe, per_stage: list[Pairs]) -> frozenset[str]:
    """Keys of the tensors a stage needs the float weight of, after an earlier stage quantized them
    (``refines``: LoRC; ``float_weights``: bias correction): the engine keeps it beside them."""
    return frozenset(t.key for st, pairs in zip(recipe.stages, per_stage)
                     if st.modifier.refines or st.modifier.float_weights for t, _ in pairs)


def _check_refined(recipe: Recipe, per_stage: list[Pairs]) -> None:
    """A refining stage acts only on tensors that an earlier stage quantizes, and once per tensor."""
    quantized: set[str] = set()
    refined: dict[str, int] = {}
    for i, (stage, pairs) in enumerate(zip(recipe.stages, per_stage)):
        m = stage.modifier
        if m.refines:
            missing = [t.key for t, _ in pairs if t.key not in quantized]
            if missing:
                raise LowbitError(f"stage {i + 1} ({m.name}): no earlier stage quantizes {missing[0]}, and method "
                                  f"{m.name} corrects a quantized weight; put a quantizing method before it (e.g. "
                                  f"rtn+{m.name}) or narrow its targets")
            again = [t.key for t, _ in pairs if t.key in refined]
            if again:
                raise LowbitError(f"stage {i + 1} ({m.name}) would correct {again[0]} a second time (stage "
                                  f"{refined[again[0]]} already does); a tensor takes one correction: drop the "
                                  f"repeated stage (for a larger correction raise its rank) or narrow its targets")
            refined.update({t.key: i + 1 for t, _ in pairs})
        elif "weight" in m.produces:
            quantized |= {t.key for t, s in pairs if s.weight is not None}


def stage_candidates(stage: Stage, pairs: Pairs) -> Pairs:
    """The plan's resolved pairs narrowed by the stage's targets, with its scheme when it gives one."""
    if stage.targets is not None:
        pattern = re.compile(stage.targets)
        pairs = [(t, s) for t, s in pairs if pattern.search(t.key)]
    if stage.scheme is not None:
        pairs = [(t, stage.scheme) for t, _ in pairs]
    return pairs


def _check_produced(recipe: Recipe, per_stage: list[Pairs]) -> None:
    """Every part a targeted scheme asks for is written by some stage that acts on it."""
    for part in ("weight", "sparsity"):
        wanted = {t.key: s for pairs in per_stage for t, s in pairs if getattr(s, part) is not None}
        done = {t.key for st, pairs in zip(recipe.stages, per_stage) if part in st.modifier.produces
                for t, _ in pairs}
        missing = sorted(set(wanted) - done)
        if missing:
            text = _describe(wanted[missing[0]])
            hint = "a weight method such as rtn or gptq" if part == "weight" else "a pruning method such as wanda"
            raise LowbitError(f"scheme {text} asks for {_PART_WORDS[part]}, but no stage of {recipe.name} "
                              f"produces it (e.g. for {missing[0]}); add {hint} to the recipe")
    for pairs in per_stage:
        for t, s in pairs:
            if s.input is not None and s.weight is None:
                raise LowbitError(f"scheme {_describe(s)} quantizes activations of {t.key} without quantizing its "
                                  "weight; give a weight spec too (e.g. w8a8)")
            if s.input is not None and not s.input.dynamic:
                raise LowbitError(f"scheme {_describe(s)} asks for a static input scale, which no method calibrates "
                                  "yet; use a dynamic activation spec (e.g. w8a8 rather than w8a8-static)")


def _has(scheme: TensorScheme, parts: frozenset[str]) -> bool:
    return all(getattr(scheme, p) is not None for p in parts)


def _describe(scheme: TensorScheme) -> str:
    from lowbit.schemes import describe_scheme

    return repr(describe_scheme(scheme))
