"""``lowbit export``: each target from the command line, and its refusals."""
from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def quantized_dirs(tiny_llama_dir, tmp_path_factory):
    """A tiny Llama quantized three ways: int4:g32, int8:g32 (GGUF Q8_0) and nf4:g32 (no GGUF type)."""
    import lowbit
    from lowbit.hf.load import load_model

    out = {}
    for scheme in ("int4:g32", "int8:g32", "nf4:g32"):
        loaded = load_model(tiny_llama_dir)
        lowbit.quantize(loaded.model, scheme, progress=False)
        out[scheme] = tmp_path_factory.mktemp("q") / scheme.replace(":", "_")
        lowbit.save(loaded.model, out[scheme], tokenizer=loaded.tokenizer)
    return out


def test_export_compressed_tensors(quantized_dirs, tmp_path, run):
    r = run("export", str(quantized_dirs["int4:g32"]), "--to", "compressed-tensors", "--out", str(tmp_path / "ct"))
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    again = run("export", str(quantized_dirs["int4:g32"]), "--to", "compressed-tensors", "--out", str(tmp_path / "ct"))
    assert again.returncode == 2 and "already exists" in again.stderr  # no silent overwrite


def test_export_gguf(quantized_dirs, tmp_path, run):
    import gguf

    r = run("export", str(quantized_dirs["int8:g32"]), "--to", "gguf", "--out", str(tmp_path / "m.gguf"))
    assert r.returncode == 0, r.stderr
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert "Q8_0" in types


def test_export_refusals(quantized_dirs, tmp_path, run):
    r = run("export", str(quantized_dirs["int4:g32"]), "--to", "tflite", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "compressed-tensors, gguf, onnx" in r.stderr
    r = run("export", str(tmp_path / "missing"), "--to", "gguf", "--out", str(tmp_path / "x.gguf"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run("export", str(quantized_dirs["nf4:g32"]), "--to", "gguf", "--out", str(tmp_path / "x.gguf"))
    assert r.returncode == 2 and "nf4" in r.stderr and "Q4_0" in r.stderr  # names the scheme and what fits
    assert not (tmp_path / "x.gguf").exists()


def test_export_sparse_format_from_the_cli(tiny_llama_dir, tmp_path, run):
    pruned = tmp_path / "p"
    assert run("prune", str(tiny_llama_dir), "--method", "magnitude", "--pattern", "2:4", "--out",
               str(pruned)).returncode == 0
    r = run("export", str(pruned), "--to", "compressed-tensors", "--sparse-format", "sparse-24-bitmask", "--out",
            str(tmp_path / "ct"))
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["sparsity_structure"] == "2:4"
    r = run("export", str(pruned), "--to", "onnx", "--sparse-format", "sparse-bitmask", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "sparse format 'sparse-bitmask' is compressed-tensors'" in r.stderr
