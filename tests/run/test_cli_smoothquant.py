"""`lowbit quantize --method smoothquant+rtn --scheme w8a8`: the streamed CLI run equals the in-memory
run, every loader and `lowbit eval` reproduce its logits, a recipe file gives the same bytes, and a
killed run resumes to the same bytes (the folded norms are float changes kept by the checkpoint)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from cli_kill import KILL_AFTER_FIRST_BLOCK, files  # noqa: E402

SQ = ("--method", "smoothquant+rtn", "--scheme", "w8a8", "--samples", "4", "--seq-len", "32", "--batch-size", "2")


@pytest.fixture(scope="module")
def in_memory(tiny_llama_dir, tmp_path_factory):
    """The same run done in memory through the API, saved; (folder, model, tokenizer, original norm)."""
    from lowbit.calib import calibration_windows
    from lowbit.engine.runner import calibrate
    from lowbit.hf.load import load_model
    from lowbit.io import save
    from lowbit.models.targets import default_plan
    from lowbit.schemes import parse_tensor_scheme

    loaded = load_model(tiny_llama_dir)
    norm = loaded.model.model.layers[1].input_layernorm.weight.detach().clone()
    windows = calibration_windows(loaded.tokenizer, "pydoc", 4, 32, seed=0, progress=False)
    plan = default_plan(loaded.model, parse_tensor_scheme("w8a8"))
    calibrate(loaded.model, plan, "smoothquant+rtn", list(windows.split(2)), progress=False)
    out = tmp_path_factory.mktemp("sq") / "memory"
    save(loaded.model, out, tokenizer=loaded.tokenizer)
    return out, loaded.model.eval(), loaded.tokenizer, norm


def test_streamed_cli_run_equals_the_in_memory_run_and_reloads_exactly(run, tiny_llama_dir, tmp_path, in_memory):
    from lowbit.eval import eval_text, evaluate, token_windows
    from lowbit.hf.quantizer import install_hook, loading
    from lowbit.io import read_weights
    from lowbit.nn import kernel_counts
    from lowbit.schemes import parse_tensor_scheme
    import lowbit

    memory, model, tokenizer, norm = in_memory
    out = tmp_path / "q"
    r = run("quantize", str(tiny_llama_dir), "--out", str(out), *SQ)
    assert r.returncode == 0, r.stderr
    assert "fallback" not in r.stdout
    streamed, saved = read_weights(out), read_weights(memory)
    assert streamed.keys() == saved.keys()
    for k in saved:
        assert torch.equal(streamed[k], saved[k]), k
    folded = streamed["model.layers.1.input_layernorm.weight"]
    assert not torch.allclose(folded, norm)  # the smoothed norm is what was saved

    x = torch.tensor([[1, 5, 9, 2, 7, 3, 8, 4]])
    with torch.no_grad():
        ref = model(x).logits
    install_hook()
    with loading(packed=False):
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(out).eval()
    int8_token = parse_tensor_scheme("w8a8").input
    for loaded in (lowbit.load(out, packed=False), hf):
        with torch.no_grad():
            assert torch.equal(loaded(x).logits, ref)
        q = loaded.model.layers[0].self_attn.q_proj
        h = torch.randn(3, q.in_features)
        assert not torch.allclose(q(h), h @ q.weight.t())  # its input is really quantized
    packed = lowbit.load(out)
    assert kernel_counts(packed) == {"int8": 14} and packed.model.layers[0].mlp.up_proj.input == int8_token
    with torch.no_grad():
        assert (packed(x).logits - ref).abs().max() <= 0.02 * ref.abs().max()

    e = run("eval", str(out), "--json", "--seq-len", "32", "--windows", "2")
    assert e.returncode == 0, e.stderr
    want = evaluate(model, token_windows(tokenizer, eval_text(None), 32, 2), progress=False)
    assert json.loads(e.stdout)["ppl"] == want["ppl"]


def test_a_recipe_file_gives_the_same_bytes_and_alpha_is_an_option(run, tiny_llama_dir, tmp_path):
    ref = tmp_path / "ref"
    assert run("quantize", str(tiny_llama_dir), "--out", str(ref), *SQ).returncode == 0
    recipe = tmp_path / "sq.yaml"
    recipe.write_text("stages:\n  - method: smoothquant\n    alpha: 0.5\n  - method: rtn\n")
    out = tmp_path / "recipe"
    args = [a for a in SQ if a not in ("--method", "smoothquant+rtn")]
    r = run("quantize", str(tiny_llama_dir), "--out", str(out), *args, "--recipe", str(recipe))
    assert r.returncode == 0, r.stderr
    assert files(out) == files(ref)
    other = tmp_path / "alpha"
    assert run("quantize", str(tiny_llama_dir), "--out", str(other), *SQ, "--alpha", "0.8").returncode == 0
    assert files(other) != files(ref)


def test_kill_9_then_resume_gives_identical_bytes(run, tiny_llama_dir, tmp_path):
    ref = tmp_path / "ref"
    assert run("quantize", str(tiny_llama_dir), "--out", str(ref), *SQ).returncode == 0
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_BLOCK, "quantize", str(tiny_llama_dir),
                             "--out", str(out), *SQ], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert json.loads((tmp_path / "out.partial" / "state.json").read_text())["done"] == 1
    resumed = run("quantize", str(tiny_llama_dir), "--out", str(out), *SQ, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at block" in resumed.stdout
    assert files(out) == files(ref)
