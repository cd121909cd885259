"""``lowbit prune``: one-shot pruning runs, the per-layer sparsity report, and one-line refusals
(exit 2, nothing written) for bad sparsities, patterns, widths and tied embeddings."""
from __future__ import annotations

import json

import pytest
import torch

import lowbit
from lowbit.nn.reference import masks, quantized_tensors


@pytest.mark.parametrize("method,args,ratio", [
    ("magnitude", ["--sparsity", "0.5"], 0.5),
    ("sparsegpt", ["--pattern", "2:4"], 0.5),
    ("wanda", ["--sparsity", "0.3"], 0.3),
    ("magnitude", ["--sparsity", "0.6", "--allocation", "global", "--min-keep", "0.05"], None),
    ("wanda", ["--sparsity", "0.5", "--allocation", "erk"], None),  # calibrated and not streamed: reads every weight
])
def test_prune_writes_the_folder_and_reports_each_layer(run, tiny_llama_dir, tmp_path, method, args, ratio):
    out = tmp_path / "p"
    r = run("prune", str(tiny_llama_dir), "--method", method, *args, "--samples", "4", "--seq-len", "32",
            "--out", str(out), "--report", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    assert "measured sparsity per layer" in r.stdout and "14 tensors pruned" in r.stdout
    model = lowbit.load(out)
    found = {n: m for n, _, m in masks(model)}
    assert len(found) == 14
    for name, keep in found.items():
        if ratio is not None:
            assert abs(float((~keep).float().mean()) - ratio) < 0.02, name
        assert torch.equal(model.get_submodule(name).weight == 0, ~keep)
    numbers = json.loads((tmp_path / "r.json").read_text())
    assert numbers["method"] == method and numbers["bits_per_weight"] is None


def test_magnitude_with_rd_allocation_takes_calibration_data(run, tiny_llama_dir, tmp_path):
    out = tmp_path / "rd"
    r = run("prune", str(tiny_llama_dir), "--method", "magnitude", "--sparsity", "0.5", "--allocation", "rd",
            "--rd-steps", "4", "--rd-tokens", "32", "--samples", "4", "--seq-len", "32", "--out", str(out))
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    targeted = sum(m.weight.numel() for n, m in dense.named_modules()
                   if isinstance(m, torch.nn.Linear) and ".layers." in n)  # the 14 block linears
    ratios = [float((~m).float().mean()) for _, _, m in masks(lowbit.load(out))]  # a layer left dense has none
    pruned = sum(int((~m).sum()) for _, _, m in masks(lowbit.load(out)))
    assert pruned >= targeted // 2 and "measured sparsity per layer" in r.stdout  # the budget holds
    assert len({round(x, 3) for x in ratios}) > 1 and max(ratios) < 1  # per-layer, none pruned whole
    assert all(abs(x * 4 - round(x * 4)) < 0.01 for x in ratios)  # on the 1/rd_steps grid


def test_prune_and_quantize_in_one_command(run, tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    r = run("prune", str(tiny_llama_dir), "--method", "sparsegpt", "--pattern", "2:4", "--quantize", "uint4:g32",
            "--samples", "4", "--seq-len", "32", "--out", str(out))
    assert r.returncode == 0, r.stderr
    found = list(quantized_tensors(lowbit.load(out, packed=False)))
    assert len(found) == 14 and all(qt.mask is not None for _, _, qt, _ in found)


@pytest.mark.parametrize("args,message", [
    (["--sparsity", "1.0"], "--sparsity 1 is outside [0, 1)"),
    (["--sparsity", "-0.2"], "--sparsity -0.2 is outside [0, 1)"),
    ([], "give --sparsity (a fraction in [0, 1), e.g. 0.5) or --pattern"),
    (["--pattern", "4:2"], "--pattern '4:2' is not N:M with 0 < N < M"),
    (["--pattern", "2:4", "--sparsity", "0.3"], "--pattern 2:4 removes 0.5 of the weights, not --sparsity 0.3"),
    (["--pattern", "3:5"], "N:M sparsity 3:5 needs input widths that are multiples of 5, but model.layers.0"),
    (["--sparsity", "0.5", "--allocation", "owl"], "allocation 'owl' unknown"),
    (["--structure", "rows", "--sparsity", "0.25"], "--structure 'rows' unknown; use one of channels, heads"),
    (["--structure", "channels", "--pattern", "2:4"], "--pattern and --quantize do not apply"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(run, tiny_llama_dir, tmp_path, args, message):
    out = tmp_path / "bad"
    r = run("prune", str(tiny_llama_dir), "--method", "magnitude", *args, "--out", str(out))
    assert r.returncode == 2, (r.stdout, r.stderr)
    errors = [line for line in r.stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and r.stderr.rstrip().endswith(errors[0]), r.stderr
    assert not out.exists() and not list(tmp_path.glob(".bad*"))


def test_pruning_a_tied_embedding_is_refused(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from lowbit.errors import LowbitError
    from lowbit.scheme import Rule, SparsitySpec, TensorScheme

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)  # tie_word_embeddings=True
    rules = [Rule(r"lm_head$", TensorScheme(sparsity=SparsitySpec("unstructured", 0.5)))]
    with pytest.raises(LowbitError, match=r"stage 1 \(magnitude\): lm_head is tied to model.embed_tokens.weight .*"
                                          "pruning it would prune the embedding table too"):
        lowbit.quantize(model, rules, method="magnitude", progress=False)
    assert not list(masks(model))


@pytest.mark.parametrize("extra", [["--pattern", "2:4"], ["--sparsity", "0.5", "--quantize", "uint4:g32"],
                                   ["--sparsity", "0.5", "--allocation", "rd", "--rd-steps", "4", "--rd-tokens", "32"]])
def test_interrupted_prune_resumes_to_identical_bytes(run, tiny_llama_dir, tmp_path, monkeypatch, extra):
    """SparseGPT (pruning alone, and joint with quantization) stopped after block 0's checkpoint,
    then resumed: the saved tensors are byte-identical to an uninterrupted run's."""
    from lowbit.engine import checkpoint

    args = ("--method", "sparsegpt", *extra, "--samples", "4", "--seq-len", "32", "--batch-size", "2")
    assert run("prune", str(tiny_llama_dir), "--out", str(tmp_path / "ref"), *args).returncode == 0
    done = checkpoint.RunDir.mark_done

    def stop_after_first(self, block):
        done(self, block)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.RunDir, "mark_done", stop_after_first)
    assert run("prune", str(tiny_llama_dir), "--out", str(tmp_path / "out"), *args).returncode == 130
    monkeypatch.setattr(checkpoint.RunDir, "mark_done", done)
    r = run("prune", str(tiny_llama_dir), "--out", str(tmp_path / "out"), *args, "--resume")
    assert r.returncode == 0 and "resumed at block" in r.stdout, r.stderr
    names = sorted(p.name for p in (tmp_path / "ref").iterdir() if p.suffix == ".safetensors")
    assert names
    for name in names:
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name


def test_structured_prune_saves_a_smaller_model_transformers_loads(run, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "narrow"
    r = run("prune", str(tiny_llama_dir), "--structure", "channels", "--sparsity", "0.25", "--samples", "4",
            "--seq-len", "32", "--out", str(out), "--report", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == 96 and model.model.layers[0].mlp.down_proj.weight.shape == (64, 96)
    assert json.loads((tmp_path / "r.json").read_text())["seconds"] > 0
