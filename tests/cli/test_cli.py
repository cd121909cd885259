"""The `lowbit` command: formats, quantize, eval, and one-line errors for bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def lowbit(*args: str) -> subprocess.CompletedProcess:
    """Run the real console entry point in a fresh interpreter (slow: use for end-to-end runs)."""
    code = "from lowbit.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=ENV, timeout=300)


def test_formats_json_lists_every_format_with_its_table():
    r = lowbit("formats", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    from lowbit.formats import all_formats

    assert set(rows) == set(all_formats())
    assert rows["int4"]["bits"] == 4 and rows["int4"]["max"] == 8 and rows["int4_narrow"]["max"] == 7
    assert rows["uint3"]["values"] == list(range(8))
    for name, row in rows.items():
        assert {"name", "bits", "max", "values"} <= set(row)
        assert max(abs(v) for v in row["values"]) == row["max"], name


def test_quantize_then_eval_json(tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    r = lowbit("quantize", str(tiny_llama_dir), "--scheme", "w4g32-asym", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "lowbit.json").is_file() and (out / "tokenizer.json").is_file()
    r = lowbit("eval", str(out), "--reference", str(tiny_llama_dir), "--seq-len", "32", "--windows", "3", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["tokens"] == 3 * 31
    assert result["ppl"] > 1 and result["kl"] >= 0 and result["seconds"] > 0
    # the same numbers as the Python API on the reloaded model
    import lowbit as lb
    from lowbit.eval import eval_text, evaluate, token_windows
    from lowbit.hf.load import load_model

    loaded = load_model(out, packed=False)  # lowbit eval scores the float32 fake-quant model
    ids = token_windows(loaded.tokenizer, eval_text(None), 32, 3)
    assert evaluate(loaded.model, ids, progress=False)["ppl"] == pytest.approx(result["ppl"], rel=1e-9)
    assert isinstance(lb.load(out), torch.nn.Module)


def test_quantize_twice_gives_identical_bytes(tiny_llama_dir, tmp_path, run):
    for name in ("a", "b"):
        r = run("quantize", str(tiny_llama_dir), "--scheme", "nvfp4", "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
    for f in ("model.safetensors", "lowbit.json", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def _assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_missing_path(tmp_path, run):
    _assert_one_line_error(run("eval", str(tmp_path / "nope")), "does not exist")
    _assert_one_line_error(run("quantize", str(tmp_path / "nope"), "-s", "w8", "-o", str(tmp_path / "o")),
                           "does not exist")


def test_unknown_scheme(tiny_llama_dir, tmp_path, run):
    _assert_one_line_error(run("quantize", str(tiny_llama_dir), "-s", "w5g7", "-o", str(tmp_path / "o")),
                           "unknown scheme", "w5g7")


def test_group_size_larger_than_dimension(tiny_llama_dir, tmp_path, run):
    r = run("quantize", str(tiny_llama_dir), "-s", "w4g128", "--group-size", "256", "-o", str(tmp_path / "o"))
    _assert_one_line_error(r, "group size 256", "at most 64")
    assert not (tmp_path / "o").exists()


def test_nan_weights(tiny_llama_dir, tmp_path, run):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("inf")
    model.save_pretrained(tmp_path / "bad")
    r = run("quantize", str(tmp_path / "bad"), "-s", "w8", "-o", str(tmp_path / "o"))
    _assert_one_line_error(r, "model.layers.1.mlp.up_proj", "NaN or Inf")
    assert not (tmp_path / "o").exists()


def test_pickle_checkpoint_refused(tmp_path, run):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"not really a pickle")
    r = run("quantize", str(tmp_path / "m"), "-s", "w8", "-o", str(tmp_path / "o"))
    _assert_one_line_error(r, "pickle", "--allow-pickle")


def test_demo_on_a_tiny_model(tiny_llama_dir, tmp_path, run):
    r = run("demo", "--model", str(tiny_llama_dir), "--scheme", "w4g32-asym", "--windows", "2", "--seq-len", "32",
            "--out", str(tmp_path / "demo"))
    assert r.returncode == 0, r.stderr
    for word in ("perplexity", "KL", "uint4:g32", "float32", "prompt"):
        assert word in r.stdout, word
    assert (tmp_path / "demo" / "lowbit.json").is_file()


def test_quantize_with_eval_reports_the_cost(tiny_llama_dir, tmp_path, run):
    r = run("quantize", str(tiny_llama_dir), "-s", "int3:g32:mse", "-o", str(tmp_path / "q"), "--eval",
            "--windows", "2", "--seq-len", "32", "--report", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    numbers = json.loads((tmp_path / "r.json").read_text())
    ev = numbers["eval"]
    assert ev["windows"] == 2 and ev["after"]["kl"] > 0 and ev["before"]["ppl"] > 1
    assert numbers["bits_per_weight"] == pytest.approx(3 + 16 / 32)
    assert "perplexity" in r.stdout and "int3:g32:mse" in r.stdout


def test_inspect_lists_quantized_tensors(tiny_llama_dir, tmp_path, run):
    assert run("quantize", str(tiny_llama_dir), "-s", "nf4g32", "-o", str(tmp_path / "q")).returncode == 0
    r = run("inspect", str(tmp_path / "q"))
    assert r.returncode == 0, r.stderr
    assert "model.layers.1.mlp.down_proj" in r.stdout and "nf4:g32" in r.stdout and "14 quantized" in r.stdout
    _assert_one_line_error(run("inspect", str(tiny_llama_dir)), "not a lowbit folder")


def test_demo_refuses_to_replace_a_folder(tiny_llama_dir, tmp_path, run):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    r = run("demo", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "precious"), "--windows", "1")
    _assert_one_line_error(r, "already exists", "--overwrite")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_unreadable_model_folders_give_one_line(tmp_path, run):
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    _assert_one_line_error(run("eval", str(tmp_path / "noweights")), "could not load")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    _assert_one_line_error(run("eval", str(tmp_path / "bad.gguf")), "could not load")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "lowbit.json").write_text("{")
    _assert_one_line_error(run("eval", str(tmp_path / "broken")), "not valid JSON")


def test_eval_settings_are_checked_before_work(tiny_llama_dir, tmp_path, run):
    _assert_one_line_error(run("eval", str(tiny_llama_dir), "--seq-len", "1000"), "context of 256")
    _assert_one_line_error(run("eval", str(tiny_llama_dir), "--windows", "0"), "--windows 0")
    r = run("quantize", str(tiny_llama_dir), "-s", "w8", "-o", str(tmp_path / "o"), "--eval", "--corpus",
            str(tmp_path / "missing.txt"))
    _assert_one_line_error(r, "missing.txt")
    assert not (tmp_path / "o").exists()
    r = run("quantize", str(tiny_llama_dir), "-s", "w8", "-o", str(tmp_path / "o"), "--report",
            str(tmp_path / "nodir" / "r.json"))
    _assert_one_line_error(r, "does not exist")
