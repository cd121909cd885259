"""Multi-stage recipes on the engine: float targets beside the quantized generation, float changes
kept by checkpoints, a resumed run equal to an uninterrupted one, the per-stage report."""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

from lowbit.engine.runner import calibrate
from lowbit.models.targets import default_plan
from lowbit.modifiers import make
from lowbit.modifiers.base import BlockData, Modifier
from lowbit.nn.reference import quantized_tensors
from lowbit.recipe.recipe import Recipe, Stage
from lowbit.schemes import parse_scheme

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import families  # noqa: E402
from families import V  # noqa: E402

SEEN: list[dict] = []  # what the probe saw, per block
STOP_AT: list[int] = []  # block index at which the probe interrupts the run (simulates a kill)


@dataclass(frozen=True)
class Probe(Modifier):
    """A block solve that records what the engine hands it and changes a float weight (a norm)."""

    name: ClassVar[str] = "probe"
    needs_data: ClassVar[bool] = True
    float_targets: ClassVar[bool] = True
    changes_float: ClassVar[bool] = True
    produces: ClassVar[frozenset] = frozenset()
    factor: float = 1.25

    def solve_block(self, block: nn.Module, data: BlockData) -> dict:
        if STOP_AT and len(SEEN) == STOP_AT[0]:
            raise KeyboardInterrupt
        SEEN.append({"fp_in": [data.fp_in[j].clone() for j in range(len(data.calls))],
                     "q_in": [data.q_in[j].clone() for j in range(len(data.calls))],
                     "fp_out": [data.fp_out[j].clone() for j in range(len(data.calls))],
                     "layers": [key for key, *_ in data.layers]})
        with torch.no_grad():
            block.input_layernorm.weight.mul_(self.factor)
        return {"scaled": 1}


def batches(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, V, (2, 12), generator=g) for _ in range(n)]


def recipe() -> Recipe:
    return Recipe((Stage(Probe()), Stage(make("gptq"))))


def float_block_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each block's output in the untouched float model (a hook per block)."""
    outs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).clone()))
             for b in model.model.layers]
    with torch.no_grad():
        model(input_ids=x)
    for h in hooks:
        h.remove()
    return outs


def test_block_solves_see_the_float_model_beside_the_quantized_one():
    SEEN.clear()
    STOP_AT.clear()
    torch.manual_seed(0)
    model = families.llama().eval()
    reference = copy.deepcopy(model)
    report = calibrate(model, default_plan(model, parse_scheme("uint4:g32")), recipe(), batches(), progress=False)
    assert len(SEEN) == 2  # one call per block
    for j, x in enumerate(batches()):
        fp = float_block_outputs(reference, x)
        for i in range(2):
            torch.testing.assert_close(SEEN[i]["fp_out"][j], fp[i])  # the float block, untouched by any stage
        torch.testing.assert_close(SEEN[1]["fp_in"][j], fp[0])
        assert not torch.allclose(SEEN[1]["q_in"][j], fp[0])  # the quantized model's inputs differ
    assert torch.equal(SEEN[0]["fp_in"][0], SEEN[0]["q_in"][0])  # both models see the same first inputs
    assert len(SEEN[0]["layers"]) == 7 and all(k.startswith("model.layers.0.") for k in SEEN[0]["layers"])
    assert torch.allclose(model.model.layers[0].input_layernorm.weight,
                          1.25 * reference.model.layers[0].input_layernorm.weight)
    assert [s.method for s in report.stages] == ["probe", "gptq"]
    assert report.stages[0].blocks == [{"scaled": 1}, {"scaled": 1}]
    assert report.stages[1].done == report.stages[1].targeted == 14
    assert report.stages[0].done == 14  # a block solve counts every targeted layer of its blocks


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in model.state_dict().items()}
    for n, p, qt, _ in quantized_tensors(model):
        for role, t in qt.to_tensors().items():
            out[f"{n}.{p}.{role}"] = t
    return out


def test_an_interrupted_run_resumes_to_the_same_model_float_changes_included(tmp_path):
    plan_spec = parse_scheme("uint4:g32")
    SEEN.clear()
    STOP_AT.clear()
    torch.manual_seed(0)
    whole = families.llama().eval()
    calibrate(whole, default_plan(whole, plan_spec), recipe(), batches(), progress=False)

    SEEN.clear()
    STOP_AT.append(1)  # block 0 finishes and is checkpointed, block 1 is interrupted
    torch.manual_seed(0)
    first = families.llama().eval()
    with pytest.raises(KeyboardInterrupt):
        calibrate(first, default_plan(first, plan_spec), recipe(), batches(), workdir=tmp_path / "run",
                  fingerprint="f", progress=False)
    STOP_AT.clear()
    torch.manual_seed(0)
    resumed = families.llama().eval()
    report = calibrate(resumed, default_plan(resumed, plan_spec), recipe(), batches(), workdir=tmp_path / "run",
                       fingerprint="f", resume=True, progress=False)
    assert report.resumed_from == 1
    a, b = state(whole), state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # the restored block keeps its scaled norm and its codes
    assert report.stages[0].blocks == [{"scaled": 1}, {"scaled": 1}]
