"""Saved folders with input quantization, masks and low-rank factors: every loader, every export."""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.hf.load import load_lowbit
from lowbit.hf.quantizer import install_hook, loading
from lowbit.nn import QuantLinear, attach, attach_mask, kernel_counts, masks, qtensors, quantized_tensors
from lowbit.scheme import ActSpec, Rule
from lowbit.schemes import parse_scheme

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import families  # noqa: E402

INT8_TOKEN = ActSpec(get_format("int8"), "token")


def logits(model, x):
    return families.output(model, x)


def from_pretrained(path, packed):
    from transformers import AutoModelForCausalLM

    install_hook()
    with loading(packed=packed):
        return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    """A tiny Llama: int8 per-channel weights, dynamic int8 per-token activations."""
    torch.manual_seed(0)
    model = families.llama().eval()
    lowbit.quantize(model, "int8:channel", progress=False)
    for name, param, qt, dtype in list(quantized_tensors(model)):
        attach(model.get_submodule(name), param, replace(qt, input=INT8_TOKEN), dtype)
    out = tmp_path_factory.mktemp("w8a8") / "q"
    lowbit.save(model, out)
    return out, model


def test_w8a8_reloads_bit_for_bit_and_packed_within_tolerance(w8a8):
    out, model = w8a8
    x = families.example_input("llama")
    ref = logits(model, x)
    layer = model.model.layers[0].self_attn.q_proj
    acts = []
    handle = layer.register_forward_pre_hook(lambda m, a: acts.append(a[0]), prepend=True)  # the raw input
    logits(model, x)
    handle.remove()
    h = acts[0].reshape(-1, 64)
    assert not torch.equal(layer(h), h @ layer.weight.t())  # the input is really quantized in memory
    for loaded in (lowbit.load(out, packed=False), load_lowbit(out, packed=False).model,
                   from_pretrained(out, packed=False)):
        assert torch.equal(logits(loaded, x), ref)
    for loaded in (lowbit.load(out), from_pretrained(out, packed=True)):
        assert kernel_counts(loaded) == {"int8": 14}
        assert loaded.model.layers[0].mlp.up_proj.input == INT8_TOKEN
        assert (logits(loaded, x) - ref).abs().max() <= 0.02 * ref.abs().max()


@pytest.fixture(scope="module")
def extras(tmp_path_factory):
    """Attention at uint4:g32 with a mask, low-rank factors and a static input scale on q_proj;
    the MLP's up_proj pruned in float (mask only)."""
    torch.manual_seed(0)
    model = families.llama().eval()
    lowbit.quantize(model, [Rule(r"self_attn\.(q|k|v|o)_proj$", parse_scheme("uint4:g32"))], progress=False)
    q = model.model.layers[0].self_attn.q_proj
    qt = qtensors(q)["weight"]
    rows, cols = qt.matrix_shape
    extra = replace(qt, mask=torch.rand(qt.shape) > 0.3, lowrank_a=torch.randn(rows, 2) * 0.01,
                    lowrank_b=torch.randn(2, cols), input=ActSpec(get_format("int8"), "tensor", dynamic=False),
                    input_scale=torch.tensor(0.03))
    attach(q, "weight", extra, torch.float32)
    up = model.model.layers[0].mlp.up_proj
    keep = torch.rand(up.weight.shape) > 0.5
    with torch.no_grad():
        up.weight.mul_(keep)
    attach_mask(up, "weight", keep)
    out = tmp_path_factory.mktemp("extras") / "q"
    lowbit.save(model, out)
    return out, model, keep


def test_every_role_survives_every_loader(extras):
    out, model, keep = extras
    x = families.example_input("llama")
    ref = logits(model, x)
    manifest = json.loads((out / "lowbit.json").read_text())
    meta = manifest["quantized"]["model.layers.0.self_attn.q_proj.weight"]
    assert meta["roles"] == ["input_scale", "lowrank_a", "lowrank_b", "mask"] and meta["input"]["dynamic"] is False
    assert manifest["masks"] == {"model.layers.0.mlp.up_proj.weight": {
        "shape": [96, 64], "tensor": "model.layers.0.mlp.up_proj.weight_mask"}}
    for packed in (False, True):
        for loaded in (lowbit.load(out, packed=packed), from_pretrained(out, packed)):
            got = logits(loaded, x)
            assert torch.equal(got, ref) if not packed else (got - ref).abs().max() <= 0.02 * ref.abs().max()
            assert [(n, p) for n, p, _ in masks(loaded)] == [("model.layers.0.mlp.up_proj", "weight")]
            assert torch.equal(next(masks(loaded))[2], keep)
            assert isinstance(loaded.model.layers[0].self_attn.q_proj, QuantLinear) is packed


@pytest.mark.parametrize("target", ["compressed-tensors", "gguf", "onnx"])
def test_exports_refuse_what_they_cannot_store(extras, w8a8, target, tmp_path):
    from lowbit.export import export

    with pytest.raises(LowbitError, match=rf"^{target} cannot store the static input scale \(input_scale\) of "
                                          r"model\.layers\.0\.self_attn\.q_proj\.weight; "):
        export(extras[0], target, tmp_path / "x")
    with pytest.raises(LowbitError, match=r"input activation spec \(input\) of model\.layers\.0\.mlp\.down_proj"):
        export(w8a8[0], target, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_exports_densify_a_float_mask(tmp_path):
    """No export target has a sparse format: a float pruned lm_head is written with its zeros
    (tests/export/test_sparse_exports.py covers every target)."""
    torch.manual_seed(0)
    model = families.llama().eval()
    lowbit.quantize(model, "w4g32", progress=False)
    head = model.lm_head
    keep = head.weight.detach().abs() > 0.01
    head.weight = torch.nn.Parameter(head.weight.detach() * keep)  # unties lm_head
    model.config.tie_word_embeddings = False
    attach_mask(head, "weight", keep)
    lowbit.save(model, tmp_path / "q")
    from lowbit.export import export
    from safetensors.torch import load_file

    out = export(tmp_path / "q", "compressed-tensors", tmp_path / "ct")
    written = load_file(out / "model.safetensors")
    assert torch.equal(written["lm_head.weight"], head.weight.detach()) and "lm_head.weight_mask" not in written
    assert json.loads((out / "config.json").read_text())["quantization_config"]["ignore"] == ["lm_head"]


def test_a_tampered_manifest_is_refused(w8a8, tmp_path):
    out = tmp_path / "q"
    shutil.copytree(w8a8[0], out)
    manifest = json.loads((out / "lowbit.json").read_text())
    q = manifest["quantized"]
    q["model.layers.0.mlp.gate_proj.weight"] = q.pop("model.layers.0.mlp.up_proj.weight")  # swapped names
    q["model.layers.0.mlp.gate_proj.weight"]["shape"] = [64, 96]
    (out / "lowbit.json").write_text(json.dumps(manifest))
    with pytest.raises(LowbitError, match="lowbit.json and config.json's quantization_config disagree on quantized "
                                          "entry model.layers.0.mlp.up_proj.weight"):
        lowbit.load(out)
