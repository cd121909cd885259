"""Which tensors of a model get quantized, and to what.

A *plan* is an ordered list of ``Rule``s; each tensor key is resolved against it and the last
matching rule wins (``scheme.resolve``). Tensor keys are module names (``model.layers.0.mlp.up_proj``)
for Linear, Conv and Embedding weights, and ``module.param`` for fused expert tensors
(``model.layers.0.mlp.experts.gate_up_proj``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from lowbit.models.blocks import find_blocks
from lowbit.nn.reference import qtensors
from lowbit.scheme import Rule, TensorScheme, resolve
from lowbit.spec import QuantSpec

#: Routers and per-expert gates stay in full precision under the default plan: they are tiny
#: and steer which experts run (llm-compressor and GPTQModel leave them alone too).
ROUTER_PATTERN = r"(^|\.)(gate|router|shared_expert_gate)$"


@dataclass(frozen=True)
class Target:
    """One quantizable tensor: ``getattr(module, param)`` with its matrix-view layout."""

    key: str
    module_name: str
    param: str
    layout: str
    kind: str  # "linear", "conv", "embedding" or "experts"
    quantized: bool = False  # already holds a QuantizedTensor


def targets(model: nn.Module) -> list[Target]:
    """Every tensor lowbit knows how to quantize (or already has), in module order."""
    out = []
    for name, module in model.named_modules():
        done = qtensors(module)
        kind = _kind(module)
        if kind in ("linear", "conv", "embedding"):
            layout = "transposed" if type(module).__name__ == "Conv1D" else "rows"
            if isinstance(getattr(module, "weight", None), nn.Parameter) or "weight" in done:
                out.append(Target(name, name, "weight", layout, kind, "weight" in done))
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() == 3:
                out.append(Target(f"{name}.{pname}", name, pname, "experts", "experts"))
        for pname, qt in done.items():
            if qt.layout == "experts":
                out.append(Target(f"{name}.{pname}", name, pname, "experts", "experts", True))
    return out


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def default_plan(model: nn.Module, spec: TensorScheme | QuantSpec) -> list[Rule]:
    """Every Linear and fused expert tensor inside the repeated blocks gets ``spec`` (a scheme).

    lm_head, embeddings, convolutions inside blocks and routers are left alone. A model without
    repeated blocks (a plain MLP or CNN) gets ``spec`` on every Linear and Conv layer. The plan
    names each tensor explicitly (one anchored rule per tensor), so it reads as what it does.
    """
    blocks = find_blocks(model)
    if blocks is None:
        keys = [t.key for t in targets(model) if t.kind in ("linear", "conv")]
    else:
        inside = re.compile(rf"^{re.escape(blocks[0])}\.\d+\.")
        keys = [t.key for t in targets(model) if t.kind in ("linear", "experts") and inside.match(t.key)
                and not re.search(ROUTER_PATTERN, t.key)]
    return [Rule(f"^{re.escape(k)}$", spec) for k in keys]


def resolve_schemes(model: nn.Module, plan: list[Rule]) -> list[tuple[Target, TensorScheme]]:
    """The (target, scheme) pairs that ``plan`` touches; the last matching rule wins."""
    pairs = []
    for t in targets(model):
        scheme = resolve(plan, t.key)
        if scheme is not None:
            pairs.append((t, scheme))
    return pairs


def resolve_targets(model: nn.Module, plan: list[Rule]) -> list[tuple[Target, QuantSpec]]:
    """The (target, weight spec) pairs that ``plan`` quantizes; the last matching rule wins."""
    return [(t, s.weight) for t, s in resolve_schemes(model, plan) if s.weight is not None]
