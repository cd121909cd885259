"""LoRC's factors through a saved folder: lowbit.load (reference and packed side path),
from_pretrained, the exports (each refuses them by name), and the command line."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.hf.quantizer import install_hook, loading
from lowbit.nn import QuantLinear, kernel_counts, quantized_tensors

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import families  # noqa: E402

KEY = "model.layers.0.self_attn.q_proj.weight"


def from_pretrained(path, packed):
    from transformers import AutoModelForCausalLM

    install_hook()
    with loading(packed=packed):
        return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module", params=["float16", "int8"])
def saved(request, tmp_path_factory):
    """A tiny Llama at int4:g32 (the packed int4 kernel) with rank-4 LoRC factors in ``param``."""
    torch.manual_seed(0)
    model = families.llama().eval()
    lowbit.quantize(model, "int4:g32", "rtn+lorc", rank=4, dtype=request.param, progress=False)
    out = tmp_path_factory.mktemp("lorc") / "q"
    lowbit.save(model, out)
    return out, model, request.param


def test_every_loader_gives_the_reference_logits(saved):
    out, model, dtype = saved
    x = families.example_input("llama")
    ref = families.output(model, x)
    meta = json.loads((out / "lowbit.json").read_text())["quantized"][KEY]
    assert meta["roles"] == ["lowrank_a", "lowrank_b"] and meta["lowrank"]["rank"] == 4
    assert meta["lowrank"]["dtype"] == dtype and ("scale" in meta["lowrank"]) == (dtype == "int8")
    for loaded in (lowbit.load(out, packed=False), from_pretrained(out, packed=False)):
        assert torch.equal(families.output(loaded, x), ref)
        qt = {f"{n}.{p}": q for n, p, q, _ in quantized_tensors(loaded)}[KEY]
        assert qt.rank == 4 and qt.lowrank_a.dtype == getattr(torch, dtype)
    for loaded in (lowbit.load(out), from_pretrained(out, packed=True)):
        layer = loaded.model.layers[0].self_attn.q_proj
        assert isinstance(layer, QuantLinear) and kernel_counts(loaded) == {"int4": 14}
        assert (families.output(loaded, x) - ref).abs().max() <= 0.02 * ref.abs().max()
    qt = {f"{n}.{p}": q for n, p, q, _ in quantized_tensors(model)}[KEY]  # the float32 side path on its own
    h = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(QuantLinear(qt, kernels=("dequant",))(h), h @ qt.dequantize().t(), atol=1e-5)


def test_bits_per_weight_count_the_factors(saved):
    out, model, dtype = saved
    torch.manual_seed(0)
    plain = families.llama().eval()
    lowbit.quantize(plain, "int4:g32", "rtn", progress=False)
    base = {f"{n}.{p}": q.nbits() for n, p, q, _ in quantized_tensors(plain)}
    per = {"float16": lambda r, c: 16 * 4 * (r + c), "int8": lambda r, c: 8 * 4 * (r + c) + 32 * 4}[dtype]
    for n, p, qt, _ in quantized_tensors(lowbit.load(out, packed=False)):
        assert qt.nbits() == base[f"{n}.{p}"] + per(*qt.matrix_shape)


@pytest.mark.parametrize("target", ["compressed-tensors", "gguf", "onnx"])
def test_exports_refuse_the_factors_by_name(saved, target, tmp_path):
    from lowbit.export import export

    with pytest.raises(LowbitError, match=rf"^{target} cannot store the low-rank factors \(lowrank_a\) of "
                                          r"model\.layers\.0\.mlp\.down_proj\.weight; export a model without it"):
        export(saved[0], target, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_command_line(tiny_llama_dir, tmp_path, run):
    r = run("quantize", str(tiny_llama_dir), "--scheme", "w4g32", "--method", "gptq+lorc", "--rank", "3",
            "--dtype", "int8", "--samples", "4", "--seq-len", "32", "--out", str(tmp_path / "q"))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "q" / "lowbit.json").read_text())
    assert all(m["lowrank"]["rank"] == 3 and m["lowrank"]["dtype"] == "int8" for m in manifest["quantized"].values())
    assert manifest["made_by"][0]["recipe"]["stages"][1] == {"method": "lorc", "rank": 3, "dtype": "int8"}
    r = run("quantize", str(tiny_llama_dir), "--scheme", "w4g32", "--method", "rtn+lorc", "--rank", "64",
            "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "lorc rank 64 does not fit" in r.stderr and not (tmp_path / "bad").exists()
    r = run("methods")
    assert r.returncode == 0 and "lorc" in r.stdout and "--rank" in r.stdout
