"""`lowbit quantize --method gptq`: streamed from safetensors, checkpointed, resumable, memory-checked."""
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

GPTQ = ("--method", "gptq", "--scheme", "uint4:g32", "--samples", "4", "--seq-len", "32", "--batch-size", "2")


def test_gptq_cli_streams_saves_and_reloads(run, tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    r = run("quantize", str(tiny_llama_dir), "--out", str(out), *GPTQ)
    assert r.returncode == 0, r.stderr
    assert "forecast: peak memory" in r.stdout and "layers solved" in r.stdout
    assert "fallback" not in r.stdout
    assert not (tmp_path / "q.partial").exists()
    assert (out / "model.safetensors.index.json").is_file()  # streamed: one shard per block, then the rest
    from lowbit.hf.load import load_lowbit

    model = load_lowbit(out).model
    manifest = json.loads((out / "lowbit.json").read_text())
    assert len(manifest["quantized"]) == 14  # 7 linears × 2 blocks
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def test_streamed_run_equals_in_memory_run(run, tiny_llama_dir, tmp_path):
    """Streaming weights block by block changes where they live, not one bit of the result."""
    from lowbit.calib import calibration_windows
    from lowbit.hf.load import load_model
    from lowbit.io import read_weights, save
    from lowbit.modifiers import make as calibrated
    from lowbit.models.targets import default_plan
    from lowbit.engine.runner import calibrate
    from lowbit.schemes import parse_scheme

    out = tmp_path / "streamed"
    assert run("quantize", str(tiny_llama_dir), "--out", str(out), *GPTQ).returncode == 0
    loaded = load_model(tiny_llama_dir)
    windows = calibration_windows(loaded.tokenizer, "pydoc", 4, 32, seed=0, progress=False)
    plan = default_plan(loaded.model, parse_scheme("uint4:g32"))
    calibrate(loaded.model, plan, calibrated("gptq"), list(windows.split(2)), progress=False)  # CLI defaults
    save(loaded.model, tmp_path / "memory", tokenizer=loaded.tokenizer)
    streamed, memory = read_weights(out), read_weights(tmp_path / "memory")
    assert streamed.keys() == memory.keys()
    for k in memory:
        assert torch.equal(streamed[k], memory[k]), k


def test_kill_9_then_resume_gives_identical_bytes(run, tiny_llama_dir, tmp_path):
    ref = tmp_path / "ref"
    assert run("quantize", str(tiny_llama_dir), "--out", str(ref), *GPTQ).returncode == 0
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_BLOCK, "quantize", str(tiny_llama_dir),
                             "--out", str(out), *GPTQ], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    partial = tmp_path / "out.partial"
    assert json.loads((partial / "state.json").read_text())["done"] == 1 and not out.exists()
    again = run("quantize", str(tiny_llama_dir), "--out", str(out), *GPTQ)
    assert again.returncode == 2 and "--resume" in again.stderr  # never silently starts over
    # a resume keeps the batch the run started with, whatever batch it would pick now
    resumed = run("quantize", str(tiny_llama_dir), "--out", str(out), *GPTQ, "--batch-size", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at block" in resumed.stdout
    assert "batch of 2 windows this run started with" in resumed.stdout
    assert files(out) == files(ref)
    assert not partial.exists()


def test_resume_with_other_arguments_is_refused(run, tiny_llama_dir, tmp_path):
    from lowbit.engine.checkpoint import RunDir

    RunDir(tmp_path / "out.partial", "0123", resume=False).mark_done(0)
    r = run("quantize", str(tiny_llama_dir), "--out", str(tmp_path / "out"), *GPTQ, "--resume")
    assert r.returncode == 2 and "different model, plan, method or calibration" in r.stderr


def test_max_memory_refuses_a_run_that_does_not_fit(run, tiny_llama_dir, tmp_path):
    r = run("quantize", str(tiny_llama_dir), "--out", str(tmp_path / "q"), *GPTQ, "--max-memory", "50MB")
    assert r.returncode == 2
    assert "more than --max-memory" in r.stderr and "raise --max-memory to" in r.stderr
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_max_memory_spills_activations_when_that_is_enough(tiny_llama_dir):
    from lowbit.engine.forecast import Shape, fit

    shape = Shape(resident_bytes=100 << 20, block_bytes=1 << 20, block_params=1 << 18, blocks=2,
                  layers=((64, 64),), hidden=64, intermediate=128, tokens=1 << 20, seq_len=512,
                  batch_tokens=4096, streamed_bytes=0)
    roomy, budget, batch = fit(shape, None, 1 << 30, 1e10, True)
    assert budget == 1 << 30 and batch == 8
    tight, budget, batch = fit(shape, roomy.peak_bytes - 1, 1 << 30, 1e10, True)
    assert budget == 0 and tight.peak_bytes < roomy.peak_bytes


def test_gptq_options_are_checked_before_loading(run, tmp_path):
    r = run("quantize", "no-such-model", "--out", str(tmp_path / "q"), *GPTQ, "--damp", "-1")
    assert r.returncode == 2 and "damp" in r.stderr


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_peak_rss_is_the_programs_own_not_its_parents():
    """ru_maxrss survives fork+exec; the reported peak must not include a large parent's."""
    from lowbit.engine.forecast import peak_rss_bytes

    ballast = torch.ones(400 * 2**20 // 4)  # 400 MiB held (and touched) by this parent
    parent = peak_rss_bytes()
    code = "from lowbit.engine.forecast import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    del ballast
    assert 0 < child < parent - 300 * 2**20, (child, parent)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_forecast_errs_high_on_a_tiny_run(tiny_llama_dir, tmp_path):
    """--max-memory trusts the forecast: a fresh program's peak (VmHWM) stays under it."""
    report = tmp_path / "numbers.json"
    code = "import sys; from lowbit.cli import main; sys.argv = ['lowbit', *sys.argv[1:]]; main()"
    subprocess.run([sys.executable, "-c", code, "quantize", str(tiny_llama_dir), "--out", str(tmp_path / "q"), *GPTQ,
                    "--report", str(report)], capture_output=True, text=True, check=True)
    numbers = json.loads(report.read_text())
    assert 0 < numbers["peak_rss_bytes"] <= numbers["forecast_bytes"], numbers


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
@pytest.mark.parametrize("method", [("adaround", "--steps", "3"), ("nupes", "--mode", "data", "--steps", "3"),
                                    ("gptq+lorc",), ("gptq+bias-correction",), ("signround+lorc", "--steps", "2")])
def test_learned_and_correcting_methods_peak_under_the_forecast(tiny_llama_dir, tmp_path, method):
    report = tmp_path / "numbers.json"
    code = "import sys; from lowbit.cli import main; sys.argv = ['lowbit', *sys.argv[1:]]; main()"
    scheme = "pow3_a0.5:g32" if method[0] == "nupes" else "uint4:g32"
    r = subprocess.run([sys.executable, "-c", code, "quantize", str(tiny_llama_dir), "--out", str(tmp_path / "q"),
                        "--method", *method, "--scheme", scheme, "--samples", "4", "--seq-len", "32",
                        "--batch-size", "2", "--report", str(report)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    numbers = json.loads(report.read_text())
    assert 0 < numbers["peak_rss_bytes"] <= numbers["forecast_bytes"], numbers


def test_time_forecast_counts_the_engine_forwards_and_each_methods_own_work():
    from dataclasses import replace

    from lowbit.engine.forecast import Shape, forecast
    from lowbit.modifiers import make
    from lowbit.modifiers.base import BlockWork

    layers = ((128, 64), (64, 128))
    work = BlockWork(layers, tokens=4096, batch_tokens=1024)
    gptq = make("gptq").flops(work)
    assert gptq == sum(2 * 4096 * c * c + 2 * r * c * c + 2 * c ** 3 for r, c in layers)
    shape = Shape(resident_bytes=0, block_bytes=0, block_params=1000, blocks=3, layers=layers, hidden=64,
                  intermediate=128, tokens=4096, seq_len=512, batch_tokens=1024, streamed_bytes=0, method_flops=gptq)
    assert forecast(shape, 0, 1e9).seconds == 3 * (2 * 2 * 1000 * 4096 + gptq) / 1e9
    lsq = make("lsq", steps=10)
    floated = replace(shape, method_flops=lsq.flops(work), float_generation=True)
    assert forecast(floated, 0, 1e9).seconds == 3 * (3 * 2 * 1000 * 4096 + lsq.flops(work)) / 1e9
    assert make("lsq", steps=20).flops(work) > lsq.flops(work) > make("lsq", steps=0).flops(work) > 0
    assert lsq.memory(replace(work, batch_tokens=2048)) > lsq.memory(work)  # the batch the run uses, not a guess
    assert make("rtn").flops(work) == 0 and make("rtn").memory(work) == 0


def test_forecast_counts_the_float_copies_a_correcting_stage_keeps(tiny_llama_dir, tmp_path):
    """LoRC and bias correction get a float32 copy of each weight of the block being solved."""
    from lowbit.calib import calibration_windows
    from lowbit.engine.pipeline import CalibratedRun, _open, _shape
    from lowbit.models.targets import default_plan
    from lowbit.recipe import Recipe
    from lowbit.schemes import parse_scheme

    scheme = parse_scheme("w4g32")
    shapes = {}
    for method in ("gptq", "gptq+lorc", "gptq+bias-correction"):
        args = CalibratedRun(str(tiny_llama_dir), scheme, tmp_path / "q", Recipe.of(method), samples=2, seq_len=16)
        model, tokenizer, streamed, _ = _open(args)
        windows = calibration_windows(tokenizer, "pydoc", 2, 16, model=model)
        shapes[method] = _shape(model, default_plan(model, scheme), streamed, args, windows)
    layers = shapes["gptq"].layers
    assert shapes["gptq"].kept_bytes == 0 and len(layers) == 7
    assert shapes["gptq+lorc"].kept_bytes == shapes["gptq+bias-correction"].kept_bytes == 4 * sum(r * c for r, c in layers)
