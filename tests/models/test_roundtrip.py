"""plan -> quantize -> save -> load gives identical outputs, for every model family."""
from __future__ import annotations

import sys

import pytest
import torch

import lowbit
from lowbit.nn.reference import quantized_tensors
from lowbit.models.targets import default_plan, targets

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import families  # noqa: E402

HF = ["llama", "qwen2", "gpt2", "mixtral", "qwen2_moe", "bert"]
SCHEMES = ["int4:g32", "uint4_fz:g32", "nvfp4", "fp8_e4m3fn:channel"]


def build(name: str):
    torch.manual_seed(0)
    if name == "bert":
        return families.bert().eval()
    if name in families.LANGUAGE:
        return families.LANGUAGE[name]().eval()
    return {"mlp": families.MLP, "cnn": families.CNN}[name]().eval()


@pytest.mark.parametrize("name", HF)
@pytest.mark.parametrize("scheme", SCHEMES[:2])
def test_hf_roundtrip_identical_logits(name, scheme, tmp_path):
    model = build(name)
    x = families.example_input(name)
    before = families.output(model, x)
    lowbit.quantize(model, scheme, progress=False)
    quantized = families.output(model, x)
    assert not torch.equal(before, quantized)  # something was quantized...
    assert torch.allclose(before, quantized, atol=0.5)  # ...and the model still computes sensibly
    lowbit.save(model, tmp_path / "q")
    reloaded = lowbit.load(tmp_path / "q", packed=False)  # the fake-quant reference
    assert type(reloaded) is type(model)
    assert torch.equal(families.output(reloaded, x), quantized)
    packed = lowbit.load(tmp_path / "q")  # packed kernels compute in bf16: within 2% of the output's scale
    got = families.output(packed, x)
    close = ((got - quantized).abs() <= 0.02 * quantized.abs().max()).all(dim=-1)  # per position
    if name in ("mixtral", "qwen2_moe"):  # bf16 rounding may flip a near-tied expert choice at one position
        assert close.float().mean() >= 0.9, close
    else:
        assert close.all()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("scheme", SCHEMES[2:])
def test_block_scaled_and_float_roundtrip(name, scheme, tmp_path):
    model = build(name)
    x = families.example_input(name)
    lowbit.quantize(model, scheme, progress=False)
    quantized = families.output(model, x)
    lowbit.save(model, tmp_path / "q")
    assert torch.equal(families.output(lowbit.load(tmp_path / "q", packed=False), x), quantized)
    packed = families.output(lowbit.load(tmp_path / "q"), x)  # the dequant kernel: float32, chunked matmul
    assert torch.allclose(packed, quantized, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_plain_module_roundtrip(name, tmp_path):
    model = build(name)
    x = families.example_input(name)
    lowbit.quantize(model, "int8:channel", progress=False)
    quantized = families.output(model, x)
    lowbit.save(model, tmp_path / "q")
    with pytest.raises(lowbit.LowbitError, match="plain PyTorch module"):
        lowbit.load(tmp_path / "q")
    torch.manual_seed(123)  # a fresh skeleton with other random weights
    reloaded = lowbit.load(tmp_path / "q", model=build(name), packed=False)
    assert torch.equal(families.output(reloaded, x), quantized)


def test_default_plan_covers_block_linears_only():
    model = build("llama")
    lowbit.quantize(model, "int4:g32", progress=False)
    keys = {f"{m}.{p}" for m, p, _, _ in quantized_tensors(model)}
    assert len(keys) == 2 * 7
    assert all(k.startswith("model.layers.") for k in keys)
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" not in keys


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_experts_quantized_routers_left_alone(name):
    model = build(name)
    lowbit.quantize(model, "int4:g32", progress=False)
    keys = {f"{m}.{p}" for m, p, _, _ in quantized_tensors(model)}
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys
    assert "model.layers.0.mlp.experts.down_proj" in keys
    assert not any(k.endswith(("mlp.gate.weight", "shared_expert_gate.weight")) for k in keys)


def test_gpt2_conv1d_groups_run_along_inputs():
    model = build("gpt2")
    lowbit.quantize(model, "int4:g32", progress=False)
    qts = {f"{m}.{p}": qt for m, p, qt, _ in quantized_tensors(model)}
    qt = qts["transformer.h.0.mlp.c_fc.weight"]  # Conv1D weight (in=64, out=256)
    assert qt.layout == "transposed" and qt.matrix_shape == (256, 64) and qt.scale.shape == (256, 2)


def test_last_rule_wins_and_skip():
    model = build("llama")
    spec4, spec8 = lowbit.parse_scheme("int4:g32"), lowbit.parse_scheme("int8:channel")
    plan = default_plan(model, spec4) + [lowbit.Rule(r"mlp\.down_proj$", spec8), lowbit.Rule(r"layers\.1\.", None)]
    lowbit.quantize(model, plan, progress=False)
    specs = {m: qt.spec for m, _, qt, _ in quantized_tensors(model)}
    assert specs["model.layers.0.mlp.down_proj"] == spec8
    assert specs["model.layers.0.mlp.up_proj"] == spec4
    assert not any(m.startswith("model.layers.1.") for m in specs)


def test_targets_see_conv_and_embedding():
    kinds = {t.kind for t in targets(build("cnn"))}
    assert kinds == {"conv", "linear"}
    assert "embedding" in {t.kind for t in targets(build("llama"))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_weights_are_refused(bad, dtype):
    model = build("mlp").to(dtype)
    with torch.no_grad():
        model.net[0].weight[0, 0] = bad
        model.net[0].weight[-1, -1] = bad
    with pytest.raises(lowbit.LowbitError, match="has 2 NaN or Inf values"):
        lowbit.quantize(model, "int8:channel", progress=False)


def test_group_larger_than_dimension_is_refused():
    with pytest.raises(lowbit.LowbitError, match="larger than"):
        lowbit.quantize(build("llama"), "int4:g128", progress=False)


@pytest.mark.parametrize("key", ["^lm_head$", "^model\\.embed_tokens$"])
def test_tied_embeddings_stay_tied_through_save_and_load(key, tmp_path):
    model = build("llama")  # tie_word_embeddings=True
    x = families.example_input("llama")
    lowbit.quantize(model, [lowbit.Rule(key, lowbit.parse_scheme("int4:g32"))], progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    quantized = families.output(model, x)
    lowbit.save(model, tmp_path / "q")
    reloaded = lowbit.load(tmp_path / "q")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(families.output(reloaded, x), quantized)


def test_quantizing_twice_is_refused_and_leaves_the_model_alone():
    model = build("llama")
    lowbit.quantize(model, "int4:g32", progress=False)
    x = families.example_input("llama")
    before = families.output(model, x)
    with pytest.raises(lowbit.LowbitError, match="already quantized"):
        lowbit.quantize(model, "int8:channel", progress=False)
    assert torch.equal(families.output(model, x), before)


def test_bad_input_changes_nothing():
    """Every tensor is checked before any module is touched."""
    model = build("mlp")
    with torch.no_grad():
        model.net[4].weight[0, 0] = float("inf")  # the last layer
    with pytest.raises(lowbit.LowbitError):
        lowbit.quantize(model, "int8:channel", progress=False)
    assert not list(quantized_tensors(model))
