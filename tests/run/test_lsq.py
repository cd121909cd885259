"""LSQ as a block solve: RTN when untrained, lower block and model error when trained, deterministic,
saved and reloaded identically, through the CLI (--method and --recipe), resumable."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.engine.runner import calibrate
from lowbit.errors import LowbitError
from lowbit.modifiers import make
from lowbit.models.targets import default_plan
from lowbit.nn.reference import quantized_tensors
from lowbit.recipe import Recipe, Stage
from lowbit.recipe.plan import plan_recipe
from lowbit.scheme import Rule
from lowbit.schemes import parse_scheme, parse_tensor_scheme

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import families  # noqa: E402
sys.path.insert(0, str(Path(__file__).parent))
from cli_kill import KILL_AFTER_FIRST_BLOCK, files  # noqa: E402

LSQ_CLI = ("--scheme", "uint4:g32", "--samples", "4", "--seq-len", "32", "--batch-size", "2")


def tiny_llama():
    torch.manual_seed(0)
    return families.llama().eval()


def batches(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, families.V, (4, 48), generator=g) for _ in range(n)]


def lsq(scheme: str, n_batches: int = 4, **options):
    model = tiny_llama()
    report = calibrate(model, default_plan(model, parse_tensor_scheme(scheme)), make("lsq", **options),
                       batches(n_batches), progress=False)
    return model, report


def tensors(model) -> dict[str, dict[str, torch.Tensor]]:
    return {name: qt.to_tensors() for name, _, qt, _ in quantized_tensors(model)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].keys() == b[k].keys() and all(torch.equal(a[k][r], b[k][r])
                                                                            for r in a[k]) for k in a)


def kl_to_float(model, x: torch.Tensor) -> float:
    with torch.no_grad():
        p = F.log_softmax(tiny_llama()(x).logits.float(), -1).flatten(0, 1)
        q = F.log_softmax(model(x).logits.float(), -1).flatten(0, 1)
    return float(F.kl_div(q, p, log_target=True, reduction="batchmean"))


@pytest.mark.parametrize("scheme", ["uint4:g32", "int4:channel", "nf4:g32+a=int8:token"])
def test_untrained_lsq_is_round_to_nearest_bit_for_bit(scheme, single_thread):
    model, report = lsq(scheme, steps=0)
    rtn = lowbit.quantize(tiny_llama(), default_plan(tiny_llama(), parse_tensor_scheme(scheme)), progress=False)
    assert len(tensors(model)) == 14 and same(tensors(model), tensors(rtn))
    x = batches(1, seed=7)[0]
    with torch.no_grad():
        assert torch.equal(model(x).logits, rtn(x).logits)  # input quantization attached too
    assert [b["kept"] for b in report.stages[0].blocks] == ["learned", "learned"]
    assert report.stages[0].done == 14


@pytest.mark.parametrize("scheme", ["uint4:g32", "int4:g32+a=int8:token"])
def test_reported_block_losses_are_the_block_errors_measured_by_hand(scheme, single_thread):
    """Block 0 sees the float model's inputs; its losses are sum((block(x) - float block(x))²) / n
    over every batch, for the RTN block (before) and for the stored block (after), inputs
    quantized as the scheme says."""
    model, report = lsq(scheme, steps=10)
    rtn = lowbit.quantize(tiny_llama(), default_plan(tiny_llama(), parse_tensor_scheme(scheme)), progress=False)
    reference = tiny_llama()
    caught = []
    handle = reference.model.layers[0].register_forward_pre_hook(lambda m, a, k: caught.append((a, k)),
                                                                  with_kwargs=True)
    with torch.no_grad():
        for b in batches():
            reference(b, use_cache=False)  # a KV cache would grow with every call below
    handle.remove()

    def outputs(block) -> list[torch.Tensor]:
        with torch.no_grad():
            return [(lambda o: o[0] if isinstance(o, tuple) else o)(block(*a, **k)) for a, k in caught]

    def mse(block) -> float:
        pairs = list(zip(outputs(block), outputs(reference.model.layers[0])))
        return sum(float(((o - r) ** 2).sum()) for o, r in pairs) / sum(o.numel() for o, _ in pairs)

    first = report.stages[0].blocks[0]
    assert first["loss_before"] == pytest.approx(mse(rtn.model.layers[0]), rel=1e-5)
    assert first["loss_after"] == pytest.approx(mse(model.model.layers[0]), rel=1e-5)
    assert first["loss_after"] < first["loss_before"]


def test_lsq_lowers_block_errors_and_the_models_kl_against_rtn(single_thread):
    held_out = torch.randint(0, families.V, (32, 48), generator=torch.Generator().manual_seed(9))
    rtn = lowbit.quantize(tiny_llama(), "uint4:g32", progress=False)
    model, report = lsq("uint4:g32")
    for block in report.stages[0].blocks:
        assert block["kept"] == "learned" and block["loss_after"] < 0.92 * block["loss_before"]  # 0.88, 0.75
        assert block["steps"] == 40 and len(block["layers"]) == 7
    # measured 0.83x (full-range int4:g32: 0.89x); on 4 held-out windows instead of 32 the ratio is noise
    assert kl_to_float(model, held_out) < 0.9 * kl_to_float(rtn, held_out)


def test_same_inputs_same_bytes(single_thread):
    a, _ = lsq("int4:g32", n_batches=3, steps=5)
    b, _ = lsq("int4:g32", n_batches=3, steps=5)
    rtn, _ = lsq("int4:g32", n_batches=3, steps=0)
    assert same(tensors(a), tensors(b))
    assert not same(tensors(a), tensors(rtn))


def test_save_and_load_give_the_same_outputs(tmp_path, single_thread):
    model, _ = lsq("uint4:g32", steps=5)
    x = batches(1, seed=3)[0]
    with torch.no_grad():
        before = model(x).logits
    lowbit.save(model, tmp_path / "lsq")
    reloaded = lowbit.load(tmp_path / "lsq", packed=False)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, before)


def test_train_weights_moves_the_float_weights_too(single_thread):
    scales_only, _ = lsq("int4:g32", n_batches=2, steps=4)
    both, report = lsq("int4:g32", n_batches=2, steps=4, train_weights=True, weight_lr=1e-3)
    codes = lambda m: {k: t["codes"] for k, t in tensors(m).items()}  # noqa: E731
    assert any(not torch.equal(codes(both)[k], codes(scales_only)[k]) for k in codes(both))
    assert all(b["loss_after"] <= b["loss_before"] for b in report.stages[0].blocks)


def test_only_the_stages_targets_are_trained(single_thread):
    """LSQ on the MLP, RTN on attention: attention equals RTN, the block report names the MLP only."""
    model = tiny_llama()
    recipe = Recipe((Stage(make("lsq", steps=5), targets=r"mlp"), Stage(make("rtn"), targets=r"self_attn")))
    report = calibrate(model, default_plan(model, parse_scheme("uint4:g32")), recipe, batches(2), progress=False)
    assert all(all(".mlp." in k for k in b["layers"]) and len(b["layers"]) == 3 for b in report.stages[0].blocks)
    rtn = tensors(lowbit.quantize(tiny_llama(), "uint4:g32", progress=False))
    mine = tensors(model)
    attention = [k for k in mine if "self_attn" in k]
    assert len(attention) == 8 and same({k: mine[k] for k in attention}, {k: rtn[k] for k in attention})
    assert not same({k: mine[k] for k in mine if ".mlp." in k}, {k: rtn[k] for k in rtn if ".mlp." in k})


def test_fused_experts_are_rounded_to_nearest_and_reported(single_thread):
    torch.manual_seed(0)
    model = families.mixtral().eval()
    report = calibrate(model, default_plan(model, parse_scheme("uint4:g32")), make("lsq", steps=2), batches(1),
                       progress=False)
    rounded = [k for b in report.stages[0].blocks for k in b.get("rounded_to_nearest", [])]
    assert rounded and all(".experts." in k for k in rounded)
    assert {n for n, *_ in quantized_tensors(model)} >= {k.rpartition(".")[0] for k in rounded}
    assert sorted(f.partition(":")[0] for f in report.fallbacks) == sorted(rounded)
    assert all("lsq does not solve it (experts), rounded to nearest" in f for f in report.fallbacks)
    solved = {r["key"] for r in report.layers}
    assert solved and not solved & set(rounded) and all(r["solve"] == "block" for r in report.layers)
    assert dict(report.rows())["layers solved"] == str(len(solved))


def test_formats_without_a_learnable_scale_are_refused_at_planning():
    model = tiny_llama()
    with pytest.raises(LowbitError, match=r"stage 1 \(lsq\): method lsq: cannot learn the scale of mxfp4"):
        plan_recipe(model, Recipe((Stage(make("lsq")),)), default_plan(model, parse_scheme("mxfp4")))
    experts = families.mixtral().eval()  # tensors lsq rounds to nearest may use any format
    rules = default_plan(experts, parse_scheme("uint4:g32")) + [Rule(r"\.experts\.", parse_tensor_scheme("mxfp4"))]
    plan_recipe(experts, Recipe((Stage(make("lsq")),)), rules)
    with pytest.raises(LowbitError, match="cannot learn the scale of mxfp4"):
        plan_recipe(experts, Recipe((Stage(make("lsq")),)), rules + [Rule(r"q_proj", parse_tensor_scheme("mxfp4"))])


def test_formats_without_a_learnable_scale_are_refused_before_any_change():
    model = tiny_llama()
    with pytest.raises(LowbitError, match=r"cannot learn the scale of mxfp4.*MX stores power-of-two.*rtn or gptq"):
        calibrate(model, default_plan(model, parse_scheme("mxfp4")), make("lsq", steps=1), batches(1), progress=False)
    assert not list(quantized_tensors(model))
    assert all(type(m).__name__ != "FakeQuantLinear" for m in model.modules())


def test_bad_options_and_stacking_on_a_quantized_layer_are_refused():
    with pytest.raises(LowbitError, match="steps must be an integer >= 0"):
        make("lsq", steps=-1)
    with pytest.raises(LowbitError, match="lr must be a positive number"):
        make("lsq", lr=0.0)
    model = tiny_llama()
    recipe = Recipe((Stage(make("rtn")), Stage(make("lsq", steps=1))))
    with pytest.raises(LowbitError, match="already quantized by an earlier stage"):
        calibrate(model, [Rule(r"mlp\.down_proj$", parse_tensor_scheme("int4:g32"))], recipe, batches(1),
                  progress=False)


def test_cli_method_and_recipe_give_the_same_bytes(run, tiny_llama_dir, tmp_path):
    by_method = run("quantize", str(tiny_llama_dir), "--out", str(tmp_path / "m"), "--method", "lsq",
                    "--steps", "3", "--lr", "0.02", *LSQ_CLI)
    assert by_method.returncode == 0, by_method.stderr
    assert "14 of 14 layers" in by_method.stdout and "fallback" not in by_method.stdout
    assert "layers solved │ 14" in by_method.stdout
    recipe = tmp_path / "lsq.yaml"
    recipe.write_text("stages:\n  - method: lsq\n    steps: 3\n    lr: 0.02\n")
    by_recipe = run("quantize", str(tiny_llama_dir), "--out", str(tmp_path / "r"), "--recipe", str(recipe),
                    *LSQ_CLI, "--report", str(tmp_path / "report.json"))
    assert by_recipe.returncode == 0, by_recipe.stderr
    assert files(tmp_path / "m") == files(tmp_path / "r")
    blocks = json.loads((tmp_path / "report.json").read_text())["stages"][0]["blocks"]
    assert len(blocks) == 2 and all(b["steps"] == 3 and b["loss_after"] <= b["loss_before"] for b in blocks)


def test_kill_9_then_resume_gives_identical_bytes(run, tiny_llama_dir, tmp_path):
    args = ("--method", "lsq", "--steps", "3", *LSQ_CLI)
    assert run("quantize", str(tiny_llama_dir), "--out", str(tmp_path / "ref"), *args).returncode == 0
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_BLOCK, "quantize", str(tiny_llama_dir),
                             "--out", str(out), *args], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert json.loads((tmp_path / "out.partial" / "state.json").read_text())["done"] == 1
    resumed = run("quantize", str(tiny_llama_dir), "--out", str(out), *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at block" in resumed.stdout
    assert files(out) == files(tmp_path / "ref")
