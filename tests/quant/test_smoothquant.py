"""SmoothQuant: scales against the formula, exact float equivalence of the folded blocks, outlier
channels flattened, the safety refusals, and plan checks; tiny random models only."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms.smoothquant import column_absmax, smoothing_scales
from lowbit.engine.capture import catch_inputs
from lowbit.errors import LowbitError
from lowbit.models.blocks import find_blocks
from lowbit.models.targets import default_plan, resolve_schemes
from lowbit.modifiers import make
from lowbit.modifiers.base import BlockData
from lowbit.nn.reference import quantized_tensors
from lowbit.schemes import parse_tensor_scheme

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import families  # noqa: E402
from families import V  # noqa: E402

W8A8 = parse_tensor_scheme("w8a8")
OUTLIER = 7  # the input channel made an outlier


@pytest.fixture(autouse=True, scope="module")
def _single_thread(single_thread):
    """Every test here runs on one thread (see ``single_thread`` in tests/conftest.py)."""


def build(name: str, outlier: float = 1.0) -> nn.Module:
    """A tiny model; ``outlier`` multiplies channel OUTLIER of every pre-attention norm's weight."""
    torch.manual_seed(0)
    model = getattr(families, name)().eval()
    with torch.no_grad():
        for n, m in model.named_modules():
            if n.endswith(("input_layernorm", "ln_1")):
                m.weight[OUTLIER] *= outlier
    return model


def batches(n: int = 2, b: int = 4, t: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, V, (b, t), generator=g) for _ in range(n)]


def smooth_float(model: nn.Module, alpha: float = 0.5) -> list[dict]:
    """SmoothQuant alone (no quantizing stage), block after block, on the float model's inputs."""
    prefix, blocks = find_blocks(model)
    calls = catch_inputs(model, blocks[0], batches())
    hidden = [c.hidden for c in calls]
    modules = dict(model.named_modules())
    pairs = resolve_schemes(model, default_plan(model, W8A8))
    infos = []
    with torch.no_grad():
        for i, block in enumerate(blocks):
            layers = [(t.key, modules[t.module_name], t.param, s) for t, s in pairs
                      if t.key.startswith(f"{prefix}.{i}.")]
            infos.append(make("smoothquant", alpha=alpha).solve_block(block, BlockData(calls, hidden, layers=layers)))
            hidden = [c.run(block, h) for c, h in zip(calls, hidden)]
    return infos


def inputs_of(model: nn.Module, layer: nn.Module) -> torch.Tensor:
    """Every calibration input of ``layer`` on the whole model, (tokens, in_features)."""
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in batches():
            model(b)
    handle.remove()
    return torch.cat(seen)


def reference_scales(x: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), channel by channel, in Python floats."""
    out = []
    for j in range(x.shape[1]):
        a = max(abs(float(v)) for v in x[:, j])
        w = max(abs(float(v)) for W in weights for v in W[:, j])
        out.append(1.0 if a == 0 or w == 0 else max(a, 1e-5) ** alpha / max(w, 1e-5) ** (1 - alpha))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_folded_scales_match_the_formula(alpha):
    model = build("llama", outlier=20.0)
    layer = model.model.layers[0]
    attn = layer.self_attn
    x = inputs_of(model, attn.q_proj)
    old = [m.weight.detach().clone() for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    old_norm = layer.input_layernorm.weight.detach().clone()
    ref = reference_scales(x, old, alpha)
    smooth_float(model, alpha)
    folded = old_norm.double() / layer.input_layernorm.weight.double()
    torch.testing.assert_close(folded, ref, rtol=1e-5, atol=0)
    for m, w in zip((attn.q_proj, attn.k_proj, attn.v_proj), old):
        torch.testing.assert_close(m.weight.double(), w.double() * ref, rtol=1e-5, atol=1e-7)


def test_dead_channels_keep_a_scale_of_one():
    act = torch.tensor([0.0, 2.0, 3.0, 4.0])
    w = torch.tensor([1.0, 0.0, 0.5, 2.0])
    s = smoothing_scales(act, w, 0.5)
    assert s[0] == 1 and s[1] == 1
    torch.testing.assert_close(s[2:], torch.tensor([(3 / 0.5) ** 0.5, (4 / 2) ** 0.5]))
    torch.testing.assert_close(column_absmax([torch.tensor([[1.0, -3.0]]), torch.tensor([[-2.0, 1.0]])]),
                               torch.tensor([2.0, 3.0]))


@pytest.mark.parametrize("name, norms", [
    ("llama", {"input_layernorm", "post_attention_layernorm"}),
    ("qwen2", {"input_layernorm", "post_attention_layernorm"}),
    ("gpt2", {"ln_1", "ln_2"}),  # LayerNorm with bias feeding GPT-2's transposed Conv1D
])
def test_folded_block_computes_the_same_function(name, norms):
    model = build(name, outlier=20.0)
    x = families.example_input(name)
    ref = families.output(model, x)
    infos = smooth_float(model)
    got = families.output(model, x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    for info in infos:
        assert set(info["smoothed"]) == norms
        assert info["scale_max"] > 2  # the outlier channel (and the random weights) really moved
        assert all("straight from a norm" in why for why in info["left"].values())  # o/down/c_proj
    if name == "llama":
        assert infos[0]["smoothed"]["input_layernorm"] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
        assert set(infos[0]["left"]) == {"self_attn.o_proj", "mlp.down_proj"}


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_the_outlier_channel_is_flattened(alpha):
    """alpha 1 makes every input channel's max 1, alpha 0 every weight column's max 1, and alpha
    0.5 makes max|X'_j| = max|W'_j| in every channel (the paper's balance)."""
    model = build("llama", outlier=30.0)
    attn = model.model.layers[0].self_attn
    before = inputs_of(model, attn.q_proj).abs().amax(0)  # (cols,)
    smooth_float(model, alpha)
    act = inputs_of(model, attn.q_proj).abs().amax(0)
    wmax = column_absmax([m.weight for m in (attn.q_proj, attn.k_proj, attn.v_proj)])
    target = {0.0: torch.ones_like(wmax), 1.0: torch.ones_like(act), 0.5: wmax}[alpha]
    torch.testing.assert_close(wmax if alpha == 0.0 else act, target, rtol=1e-4, atol=0)
    if alpha > 0:
        assert before[OUTLIER] / before.median() > 20
        assert act[OUTLIER] / act.median() < (before[OUTLIER] / before.median()) ** (1 - alpha) + 1.5


def test_norms_whose_output_is_used_elsewhere_are_left_alone():
    """Post-norm BERT adds the LayerNorm's output to the residual: scaling it would change the sum."""
    model = build("bert")
    x = families.example_input("bert")
    ref = families.output(model, x)
    infos = smooth_float(model)
    assert torch.equal(families.output(model, x), ref)
    assert infos[0]["smoothed"] == {}
    assert "also used by add" in infos[0]["left"]["intermediate.dense"]


class GemmaNorm(nn.Module):
    """An RMSNorm scaled by (1 + w), as Gemma's: dividing w by s does not divide the output by s."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n) * 0.1)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def test_a_norm_that_is_not_affine_in_its_weight_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(GemmaNorm(16), nn.Linear(16, 8))
    x = torch.randn(4, 16)
    ref = model(x).detach()
    pairs = resolve_schemes(model, default_plan(model, W8A8))
    layers = [(t.key, model.get_submodule(t.module_name), t.param, s) for t, s in pairs]
    calls = catch_inputs(model, None, [x])
    info = make("smoothquant").solve_block(model, BlockData(calls, [x], layers=layers))
    assert "not affine" in info["left"]["1"] and info["smoothed"] == {}
    assert torch.equal(model(x), ref)


def test_smoothquant_then_rtn_quantizes_weights_and_inputs():
    model = build("llama", outlier=30.0)
    x = families.example_input("llama")
    ref = families.output(model, x)
    lowbit.quantize(model, "w8a8", method="smoothquant+rtn", calib=batches(), progress=False)
    qts = list(quantized_tensors(model))
    assert len(qts) == 14 and all(qt.input == W8A8.input for _, _, qt, _ in qts)
    report = model.lowbit_report
    assert [s.done for s in report.stages] == [14, 14] and len(report.stages[0].blocks) == 2
    smooth_err = (families.output(model, x) - ref).abs().mean()
    plain = build("llama", outlier=30.0)
    lowbit.quantize(plain, "w8a8", method="rtn", progress=False)
    assert smooth_err < 0.8 * (families.output(plain, x) - ref).abs().mean()


def test_recipes_that_cannot_work_are_refused():
    model = build("llama")
    with pytest.raises(LowbitError, match="no stage of smoothquant produces it"):
        lowbit.quantize(model, "w8a8", method="smoothquant", calib=batches(), progress=False)
    with pytest.raises(LowbitError, match=r"needs .*an activation spec"):
        lowbit.quantize(model, "w8", method="smoothquant+rtn", calib=batches(), progress=False)
    with pytest.raises(LowbitError, match="put smoothquant before the stage that quantizes"):
        lowbit.quantize(model, "w8a8", method="rtn+smoothquant", calib=batches(), progress=False)
    for bad in (1.5, -0.1, True, "0.5"):
        with pytest.raises(LowbitError, match="alpha"):
            make("smoothquant", alpha=bad)
