"""The sequential runner on every tiny family: capture, shared statistics, experts, write-back."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.modifiers import make as calibrated
from lowbit.models.targets import default_plan
from lowbit.engine.runner import calibrate
from lowbit.schemes import parse_scheme
sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import families  # noqa: E402
from families import V  # noqa: E402

FAMILIES = ["llama", "qwen2", "gpt2", "mixtral", "qwen2_moe", "bert"]


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(families, name)().eval()


def token_batches(n: int = 2, b: int = 4, t: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, V, (b, t), generator=g) for _ in range(n)]


@pytest.mark.parametrize("name", FAMILIES)
def test_runner_quantizes_every_planned_tensor_of_every_family(name):
    model = build(name)
    plan = default_plan(model, parse_scheme("uint4:g32"))
    report = calibrate(model, plan, calibrated("gptq"), token_batches(), progress=False)
    from lowbit.nn.reference import quantized_tensors

    assert len(list(quantized_tensors(model))) == len(plan)
    assert report.layers and all(r["tokens"] > 0 and r["loss"] >= 0 for r in report.layers)
    assert not report.fallbacks  # every tensor solved by GPTQ, none rounded to nearest
    out = families.output(model, token_batches(1)[0])
    assert torch.isfinite(out).all()


def test_layers_sharing_an_input_share_one_statistics_pass():
    from lowbit.algorithms._hessian import HessianStats
    from lowbit.engine.observe import observe

    model = build("llama")
    block = model.model.layers[0]
    calls = []

    def counting(cols):
        stats = HessianStats(cols)
        calls.append(stats)
        return stats

    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    targets = [(n, block.get_submodule(n), "weight", "linear") for n in names]
    with torch.no_grad(), observe(targets, counting) as seen:
        for _ in range(2):
            model(token_batches(1)[0])
            seen.reset()
    assert len(calls) == 4  # qkv, o, gate/up, down
    assert seen.layers["self_attn.k_proj"] is seen.layers["self_attn.q_proj"]
    assert seen.layers["mlp.up_proj"] is seen.layers["mlp.gate_proj"]
    assert seen.layers["self_attn.o_proj"] is not seen.layers["self_attn.q_proj"]
    assert seen.layers["self_attn.q_proj"].n == 2 * 4 * 16  # each forward counted once, not three times


def test_statistics_forwards_stop_after_the_last_layer_input_with_the_same_hessians():
    """``stop_early`` skips what follows the last watched input (down_proj's own product) from
    the second forward on; every Hessian is bit-identical to whole forwards'."""
    from lowbit.algorithms._hessian import HessianStats
    from lowbit.engine.observe import ObservedAll, observe, stop_early

    model = build("llama")
    block = model.model.layers[0]
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    targets = [(n, block.get_submodule(n), "weight", "linear") for n in names]
    batches = token_batches(3)
    ran = []
    block.mlp.down_proj.register_forward_hook(lambda *a: ran.append(1))  # after down_proj's product

    def gather(early: bool) -> dict:
        with torch.no_grad(), observe(targets, HessianStats) as seen, stop_early(targets if early else []) as nxt:
            for batch in batches:
                try:
                    model(batch)
                except ObservedAll:
                    pass
                seen.reset()
                nxt()
        return {k: (v.H.clone(), v.n) for k, v in seen.layers.items()}

    whole = gather(False)
    assert len(ran) == 3
    ran.clear()
    cut = gather(True)
    assert len(ran) == 1  # the first forward runs whole, the others stop before down_proj's product
    assert whole.keys() == cut.keys()
    for k in whole:
        assert torch.equal(whole[k][0], cut[k][0]) and whole[k][1] == cut[k][1], k


def test_statistics_forwards_run_whole_when_a_layer_runs_twice():
    from lowbit.engine.observe import stop_early

    lin = nn.Linear(4, 4)
    with stop_early([("lin", lin, "weight", "linear")]) as nxt:
        for _ in range(3):
            lin(lin(torch.randn(2, 4)))  # called twice per forward: no cut, ever
            nxt()


def test_expert_statistics_match_the_tokens_each_expert_was_routed():
    """Per-expert Hessians equal those built from the router's own top-k choice, by hand."""
    from lowbit.algorithms._hessian import HessianStats
    from lowbit.engine.observe import observe

    model = build("mixtral")
    model.set_experts_implementation("eager")  # as the runner does: experts one by one
    moe = model.model.layers[0].mlp
    x = torch.randn(1, 20, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), observe([("experts.gate_up_proj", moe.experts, "gate_up_proj", "experts")],
                                  HessianStats) as seen:
        moe(x)
    with torch.no_grad():
        _, _, top = moe.gate(x.reshape(-1, 64))  # (tokens, top_k) expert indices
    per_expert = seen.experts["experts.gate_up_proj"]
    flat = x.reshape(-1, 64)
    for e, stats in per_expert.items():
        rows = (top == e).any(dim=-1)
        ref = HessianStats(64)
        ref.update(flat[rows])
        assert stats.n == int(rows.sum())
        torch.testing.assert_close(stats.H, ref.H)
    assert sum(s.n for s in per_expert.values()) == flat.shape[0] * 2  # top-2 routing


def test_experts_that_see_no_token_fall_back_and_are_reported():
    model = build("mixtral")

    def route(hidden_states):  # a router that sends every token to experts 0 and 1
        n = hidden_states.reshape(-1, 64).shape[0]
        return torch.zeros(n, 4), torch.full((n, 2), 0.5), torch.tensor([[0, 1]]).expand(n, 2)

    for layer in model.model.layers:
        layer.mlp.gate.forward = route
    plan = default_plan(model, parse_scheme("uint4:g32"))
    ones = [torch.ones(2, 8, dtype=torch.long)]
    report = calibrate(model, plan, calibrated("gptq"), ones, progress=False)
    idle = [f for f in report.fallbacks if "saw no calibration token" in f]
    assert len(idle) == 4 and all("experts [2, 3]" in f for f in idle), report.fallbacks
    for name, p in model.named_buffers():
        assert torch.isfinite(p).all(), name


def test_model_without_blocks_is_one_block():
    model = families.MLP().eval()
    plan = default_plan(model, parse_scheme("int8"))
    x = [torch.randn(16, 64, generator=torch.Generator().manual_seed(0))]
    report = calibrate(model, plan, calibrated("gptq"), x, progress=False)
    assert len(report.layers) == 3


def test_tensors_outside_the_blocks_are_rounded_and_reported():
    from lowbit.scheme import Rule

    model = build("qwen2")
    spec = parse_scheme("uint4:g32")
    plan = default_plan(model, spec) + [Rule(r"^lm_head$", spec)]
    report = calibrate(model, plan, calibrated("gptq"), token_batches(1), progress=False)
    assert any(f.startswith("lm_head: outside the repeated blocks") for f in report.fallbacks)


def test_a_block_called_without_arguments_is_named_in_the_error():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, *, x):
            return self.lin(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for b in self.blocks:
                x = b(x=x)
            return x

    net = Net()
    with pytest.raises(LowbitError, match="Block was called without positional arguments"):
        calibrate(net, default_plan(net, parse_scheme("int8")), calibrated("gptq"), [torch.randn(2, 8)],
                  progress=False)


def test_api_quantize_with_gptq_needs_calibration_data():
    import lowbit

    model = build("llama")
    with pytest.raises(LowbitError, match="needs calibration data"):
        lowbit.quantize(model, "uint4:g32", method="gptq")
    lowbit.quantize(model, "uint4:g32", method="gptq", calib=torch.randint(0, V, (4, 16)), progress=False,
                    damp=0.05)


def test_hidden_states_spilled_to_disk_give_the_same_model(tmp_path):
    """A budget of zero bytes keeps every hidden state on disk; the result does not change."""
    from lowbit.nn.reference import quantized_tensors

    plan_spec = parse_scheme("uint4:g32")
    results = []
    for budget, workdir in ((1 << 30, None), (0, tmp_path / "run")):
        model = build("llama")
        report = calibrate(model, default_plan(model, plan_spec), calibrated("gptq"), token_batches(3),
                           workdir=workdir, act_budget=budget, progress=False)
        results.append({f"{n}.{p}": qt.codes() for n, p, qt, _ in quantized_tensors(model)})
    assert results[0].keys() == results[1].keys()
    assert not report.fallbacks
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k
    assert sorted(p.name for p in (tmp_path / "run").iterdir())[:2] == ["acts-0001", "block-0000.json"]
