"""MetaAug as a block solve: adaround bit for bit with no meta steps, never worse than its start,
deterministic, saved and reloaded identically, its forecasts, through the CLI (--method and
--recipe), listed by `lowbit methods`, resumable after kill -9."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.engine.runner import calibrate
from lowbit.errors import LowbitError
from lowbit.modifiers import make
from lowbit.modifiers.base import BlockWork
from lowbit.models.targets import default_plan
from lowbit.nn.reference import quantized_tensors
from lowbit.schemes import parse_tensor_scheme

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import families  # noqa: E402
sys.path.insert(0, str(Path(__file__).parent))
from cli_kill import KILL_AFTER_FIRST_BLOCK, files  # noqa: E402

CLI = ("--scheme", "uint4:g32", "--samples", "4", "--seq-len", "32", "--batch-size", "2")


def tiny_llama():
    torch.manual_seed(0)
    return families.llama().eval()


def batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, families.V, (4, 48), generator=g) for _ in range(n)]


def tensors(model) -> dict[str, dict[str, torch.Tensor]]:
    return {name: qt.to_tensors() for name, _, qt, _ in quantized_tensors(model)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].keys() == b[k].keys() and all(torch.equal(a[k][r], b[k][r])
                                                                            for r in a[k]) for k in a)


def solve(method: str, scheme: str = "uint4:g32", n_batches: int = 2, **options):
    model = tiny_llama()
    report = calibrate(model, default_plan(model, parse_tensor_scheme(scheme)), make(method, **options),
                       batches(n_batches), progress=False)
    return model, report


@pytest.mark.parametrize("scheme", ["uint4:g32", "int4:g32+a=int8:token"])
def test_zero_meta_steps_is_adaround_bit_for_bit(scheme, single_thread):
    ada, ada_report = solve("adaround", scheme, steps=12, lr=1e-2)
    meta, meta_report = solve("metaaug", scheme, steps=12, lr=1e-2, meta_steps=0)
    assert len(tensors(meta)) == 14 and same(tensors(meta), tensors(ada))
    for a, m in zip(ada_report.stages[0].blocks, meta_report.stages[0].blocks):
        assert m["loss_after"] == a["loss_after"] and m["kept"] == a["kept"] and m["meta_steps"] == 0


def test_meta_steps_learn_an_augmentation_and_keep_the_guard(single_thread):
    model, report = solve("metaaug", steps=30, lr=1e-2, meta_steps=6)
    ada, _ = solve("adaround", steps=30, lr=1e-2)
    blocks = report.stages[0].blocks
    for b in blocks:
        assert b["meta_steps"] == 6 and len(b["meta_loss"]) == 2 and b["augment_change"] > 0
        assert b["loss_after"] <= b["loss_before"] and b["kept"] in ("learned", "start")
    assert not same(tensors(model), tensors(ada))  # the augmented batches change what is learned
    rtn = tensors(lowbit.quantize(tiny_llama(), "uint4:g32", progress=False))
    for k, t in tensors(model).items():  # only the rounding is learned: the spec's scales and zeros
        assert torch.equal(t["scale"], rtn[k]["scale"]) and torch.equal(t["zero"], rtn[k]["zero"])


def test_same_inputs_same_bytes_and_save_load(tmp_path, single_thread):
    a, _ = solve("metaaug", "int4:g32", steps=6, lr=1e-2, meta_steps=3)
    b, _ = solve("metaaug", "int4:g32", steps=6, lr=1e-2, meta_steps=3)
    assert same(tensors(a), tensors(b))
    x = batches(1, seed=3)[0]
    with torch.no_grad():
        before = a(x).logits
    lowbit.save(a, tmp_path / "meta")
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "meta", packed=False)(x).logits, before)


def test_forecasts_count_the_meta_step():
    work = BlockWork(((128, 64), (64, 128)), tokens=4096, batch_tokens=256)
    ada, plain = make("adaround"), make("metaaug", meta_steps=0)
    meta = make("metaaug")
    assert plain.memory(work) == ada.memory(work) and plain.flops(work) == ada.flops(work)
    assert meta.memory(work) > ada.memory(work) and meta.flops(work) > 3 * ada.flops(work)


def test_bad_options_are_refused_by_name():
    for bad, match in [(dict(scope="layer"), "scope 'layer' is not allowed: it reconstructs whole blocks"),
                       (dict(outer="ce"), "outer 'ce' is not allowed; use 'mse'"),
                       (dict(meta_steps=-1), "meta_steps must be an integer >= 0"),
                       (dict(width=0), "width must be an integer >= 1"),
                       (dict(meta_lr=0), "meta_lr must be a number > 0"),
                       (dict(margin_weight=-1), "margin_weight must be a number >= 0"),
                       (dict(steps=-1), "adaround steps must be an integer >= 0")]:
        with pytest.raises(LowbitError, match=match):
            make("metaaug", **bad)


def test_cli_method_recipe_and_methods_table(run, tiny_llama_dir, tmp_path):
    by_method = run("quantize", str(tiny_llama_dir), "--out", str(tmp_path / "m"), "--method", "metaaug",
                    "--steps", "3", "--meta-steps", "2", "--lr", "0.01", *CLI)
    assert by_method.returncode == 0, by_method.stderr
    assert "14 of 14 layers" in by_method.stdout and "fallback" not in by_method.stdout
    recipe = tmp_path / "ma.yaml"
    recipe.write_text("stages:\n  - method: metaaug\n    steps: 3\n    meta_steps: 2\n    lr: 0.01\n")
    by_recipe = run("quantize", str(tiny_llama_dir), "--out", str(tmp_path / "r"), "--recipe", str(recipe),
                    *CLI, "--report", str(tmp_path / "report.json"))
    assert by_recipe.returncode == 0, by_recipe.stderr
    assert files(tmp_path / "m") == files(tmp_path / "r")
    blocks = json.loads((tmp_path / "report.json").read_text())["stages"][0]["blocks"]
    assert len(blocks) == 2 and all(b["meta_steps"] == 2 and b["augment_change"] > 0 for b in blocks)
    table = run("methods").stdout
    assert "metaaug" in table and "--meta-steps" in table and "--pkt-weight" in table


def test_kill_9_then_resume_gives_identical_bytes(run, tiny_llama_dir, tmp_path):
    args = ("--method", "metaaug", "--steps", "3", "--meta-steps", "2", "--lr", "0.01", *CLI)
    assert run("quantize", str(tiny_llama_dir), "--out", str(tmp_path / "ref"), *args).returncode == 0
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_BLOCK, "quantize", str(tiny_llama_dir),
                             "--out", str(out), *args], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    resumed = run("quantize", str(tiny_llama_dir), "--out", str(out), *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at block" in resumed.stdout
    assert files(out) == files(tmp_path / "ref")
