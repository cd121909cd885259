"""§15 rate-distortion allocation on a language model: the output curves against a slow reference
(the full model's logits), the model left untouched, and allocation="rd" through the engine."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.algorithms.rd_allocation import grid_pruned, rate_distortion
from lowbit.errors import LowbitError
from lowbit.modifiers import make
from lowbit.nn.reference import masks
from lowbit.pruning.rd_output import calibration_tokens, output_curves

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import families  # noqa: E402


def tiny(kind: str = "llama"):
    torch.manual_seed(0)
    return getattr(families, kind)().eval()


def windows(rows: int = 2, width: int = 16):
    return torch.randint(0, families.V, (rows, width), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def reference_delta(model, name: str, x: torch.Tensor, j: int, steps: int, criterion: str = "magnitude") -> float:
    """Slow and obvious: prune a deep copy, run the whole model, compare the logits (float64)."""
    ref = model(x).logits.double()
    pruned = copy.deepcopy(model)
    w = pruned.get_parameter(name)
    if criterion == "magnitude":
        flat = w.detach().reshape(-1).clone()
        flat[torch.sort(flat.abs(), stable=True).indices[:grid_pruned(flat.numel(), j, steps)]] = 0
        w.data.copy_(flat.reshape(w.shape))
    else:  # Wanda: per row, the lowest |w_ij| * ||x_j|| over the calibration tokens go
        seen = []
        module = pruned.get_submodule(name.rsplit(".", 1)[0])
        handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
        pruned(x)
        handle.remove()
        score = w.detach().abs().double() * seen[0].double().norm(dim=0)
        k = grid_pruned(w.shape[1], j, steps)
        for r in range(w.shape[0]):
            w.data[r, torch.sort(score[r], stable=True).indices[:k]] = 0
    out = pruned(x).logits.double()
    return float((ref - out).square().sum(-1).mean())


@pytest.mark.parametrize("kind, criterion", [("llama", "magnitude"), ("qwen2", "magnitude"), ("gpt2", "magnitude"),
                                             ("llama", "wanda"), ("qwen2", "wanda")])
def test_output_curves_match_the_full_logits(kind, criterion):
    model, x = tiny(kind), windows()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, p in model.named_parameters() if p.ndim == 2 and (".layers." in n or ".h." in n)]
    names = [names[0], names[len(names) // 2], names[-1]]  # first block, middle, last block
    if kind == "qwen2":
        names.append("lm_head.weight")  # untied: the head itself is a layer
    steps = 4
    if criterion == "wanda":
        names = [n for n in names if kind != "gpt2"]  # GPT-2's Conv1D is not a Linear
    curves = output_curves(model, [(n, model.get_parameter(n)) for n in names], x, steps, keep=[0] * len(names),
                           criterion=criterion, progress=False)
    for name, curve in zip(names, curves):
        assert curve[0] == 0 and curve.shape == (steps + 1,)
        expect = torch.tensor([0.0] + [reference_delta(model, name, x, j, steps, criterion)
                                       for j in range(1, steps + 1)], dtype=torch.float64)
        assert torch.allclose(curve, expect, rtol=1e-4, atol=1e-9), (name, curve, expect)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights restored
    assert not any("forward" in m.__dict__ for m in model.modules())  # no patch left behind
    assert torch.equal(model(x).logits, tiny(kind)(x).logits)


def test_keep_forbids_amounts_without_measuring_them():
    model, x = tiny(), windows()
    w = model.model.layers[0].mlp.up_proj.weight  # (96, 64): 6144 weights
    (curve,) = output_curves(model, [("model.layers.0.mlp.up_proj.weight", w)], x, 4, keep=[3000], progress=False)
    assert torch.isfinite(curve[:3]).all() and torch.isinf(curve[3:]).all()  # 50% keeps 3072, 75% keeps 1536


def test_a_wanda_curve_of_a_non_linear_weight_is_refused_and_leaves_no_hook():
    model = tiny("gpt2")  # Conv1D projections
    name = "transformer.h.0.mlp.c_fc.weight"
    with pytest.raises(LowbitError, match="wanda criterion need Linear weights; transformer.h.0.mlp.c_fc.weight"):
        output_curves(model, [(name, model.get_parameter(name))], windows(), 2, criterion="wanda", progress=False)
    assert not any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in model.modules())


def test_calibration_tokens_takes_whole_windows_or_cuts_one():
    batches = list(windows(4, 16).split(2))
    assert calibration_tokens(batches, 10).shape == (1, 10)
    assert calibration_tokens(batches, 40).shape == (3, 16)
    with pytest.raises(LowbitError, match="token windows"):
        calibration_tokens([torch.zeros(3)], 8)


def test_rd_allocation_through_the_engine_minimizes_the_measured_distortion():
    calib = windows(4, 16)
    model = lowbit.quantize(tiny(), "s=50%", method="magnitude", allocation="rd", rd_steps=5, rd_tokens=32,
                            calib=calib, progress=False)
    found = {n: m for n, _, m in masks(model)}
    total = sum(m.numel() for m in found.values())
    pruned = sum(int((~m).sum()) for m in found.values())
    assert pruned >= total // 2  # the budget: keeps at most half
    base = tiny()
    names = [f"{n}.weight" for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    ratios = {n: float((~found[n[:-7]]).float().mean()) if n[:-7] in found else 0.0 for n in names}  # absent: dense
    assert len({round(r, 3) for r in ratios.values()}) > 1  # per-layer ratios on the 1/5 grid
    assert all(abs(r * 5 - round(r * 5)) < 0.02 for r in ratios.values())
    # the allocation is the DP's on the same curves, and beats uniform on the summed distortion
    curves = output_curves(base, [(n, base.get_parameter(n)) for n in names], calibration_tokens([calib], 32), 5,
                           progress=False)
    sizes = [base.get_parameter(n).numel() for n in names]
    expect = rate_distortion(curves, sizes, 0.5)
    assert [round(ratios[n], 6) for n in names] == [round(e, 6) for e in expect]
    assert all(torch.isinf(c[5]) for c in curves) and max(ratios.values()) < 0.81  # no layer pruned whole
    chosen = sum(float(c[round(r * 5)]) for c, r in zip(curves, expect))
    assert chosen <= sum(float(c[3]) for c in curves)  # below uniform 60%, which also meets the budget


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_pruners_take_rd(method):
    model = lowbit.quantize(tiny(), "s=50%", method=method, allocation="rd", rd_steps=4, rd_tokens=16,
                            calib=windows(4, 16), progress=False)
    found = [m for _, _, m in masks(model)]
    assert len({round(float((~m).float().mean()), 3) for m in found}) > 1


def test_rd_needs_data_and_says_so():
    assert make("magnitude", allocation="rd").needs_data and not make("magnitude").needs_data
    with pytest.raises(LowbitError, match="needs calibration data"):
        lowbit.quantize(tiny(), "s=50%", method="magnitude", allocation="rd", progress=False)
    with pytest.raises(LowbitError, match="allocation 'rd' unknown; use one of uniform, global, erk, lamp$"):
        make("random", allocation="rd")
    with pytest.raises(LowbitError, match="min_keep applies to allocation=global or rd only"):
        make("sparsegpt", allocation="erk", min_keep=0.1)
    with pytest.raises(LowbitError, match="rd_steps 0 must be a positive integer"):
        make("wanda", allocation="rd", rd_steps=0)
