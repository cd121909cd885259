"""transformers' from_pretrained on a lowbit folder, through lowbit's registered quantizer."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.nn import QuantLinear, kernel_counts

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import families  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = families.llama().eval()
    lowbit.quantize(model, "w4g32", progress=False)
    out = tmp_path_factory.mktemp("hf") / "q"
    lowbit.save(model, out)
    return out, model


def test_from_pretrained_returns_the_packed_model(saved):
    from transformers import AutoModelForCausalLM

    out, model = saved
    x = families.example_input("llama")
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(hf.model.layers[0].mlp.down_proj, QuantLinear)
    assert kernel_counts(hf) == {"int4": 14}
    with torch.no_grad():
        got = hf(x).logits
        assert torch.equal(got, lowbit.load(out)(x).logits)  # the same packed model as lowbit.load
        ref = model(x).logits
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()
    assert hf.generate(x[:1, :4], max_new_tokens=5, do_sample=False, min_new_tokens=5).shape == (1, 9)


def test_saved_config_describes_the_scheme(saved):
    out, _ = saved
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "lowbit" and qc["format_version"] == 3
    assert qc["scheme"] == "int4:g32 (14 tensors)"
    manifest = json.loads((out / "lowbit.json").read_text())
    assert qc["quantized"] == manifest["quantized"]


@pytest.mark.parametrize("scheme", ["nvfp4", "uint4_fz:g32:hqq", "int8:channel"])
def test_from_pretrained_every_stored_role(scheme, tmp_path):
    """Float zeros, packed integer zeros and NVFP4's global scale all load through transformers."""
    from transformers import AutoModelForCausalLM

    model = families.gpt2().eval()
    x = families.example_input("gpt2")
    lowbit.quantize(model, scheme, progress=False)
    lowbit.save(model, tmp_path / "q")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(hf(x).logits, lowbit.load(tmp_path / "q")(x).logits)


def test_registration_when_transformers_is_imported_first(saved):
    out, _ = saved
    code = ("import transformers.quantizers.auto, transformers; import lowbit; "
            f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}); "
            "print(type(m.model.layers[0].mlp.up_proj).__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("QuantLinear")


def test_unquantized_save_has_no_quantization_config(tmp_path):
    lowbit.save(families.llama(), tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_reloading_lowbit_before_transformers_does_not_recurse():
    code = ("import importlib, lowbit.hf.quantizer as q; importlib.reload(q); q.install_hook(); "
            "import transformers.quantizers.auto as a; print('lowbit' in a.AUTO_QUANTIZER_MAPPING)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "True"
