"""Empirical bias correction after a quantizer: zero mean output error per channel on the
calibration inputs (exact property), a lower model error than the quantizer alone, biases created,
saved, loaded and resumed."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.engine.runner import calibrate
from lowbit.errors import LowbitError
from lowbit.modifiers import make
from lowbit.modifiers.bias_correction import GUARD_WINDOWS
from lowbit.nn.reference import added_biases
from lowbit.models.targets import default_plan
from lowbit.recipe import Recipe, Stage
from lowbit.schemes import parse_scheme

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import families  # noqa: E402


def tiny_llama():
    torch.manual_seed(0)
    return families.llama().eval()


def batches(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, families.V, (4, 48), generator=g) for _ in range(n)]


def kl_to_float(model, x: torch.Tensor) -> float:
    with torch.no_grad():
        p = F.log_softmax(tiny_llama()(x).logits.float(), -1).flatten(0, 1)
        q = F.log_softmax(model(x).logits.float(), -1).flatten(0, 1)
    return float(F.kl_div(q, p, log_target=True, reduction="batchmean"))


def test_mean_output_error_per_channel_is_zero_on_the_calibration_inputs(single_thread):
    """Block 0 sees the float model's inputs; down_proj's inputs do not depend on its own bias, so
    over them E[W x] − E[Ŵ x + b] must vanish channel by channel."""
    model, reference = tiny_llama(), tiny_llama()
    recipe = Recipe((Stage(make("rtn")), Stage(make("bias-correction", shrink=1), targets=r"mlp\.down_proj")))
    calibrate(model, default_plan(model, parse_scheme("int3:channel")), recipe, batches(), progress=False)
    down, float_down = model.model.layers[0].mlp.down_proj, reference.model.layers[0].mlp.down_proj
    assert reference.model.layers[0].mlp.down_proj.bias is None and down.bias is not None
    caught = []
    h = down.register_forward_pre_hook(lambda m, a: caught.append(a[0].detach()))
    with torch.no_grad():
        for b in batches():
            model(b, use_cache=False)
    h.remove()
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in caught])  # (tokens, in)
    with torch.no_grad():
        err = (float_down(x).double() - down(x).double()).mean(0)  # (out,)
        before = (float_down(x).double() - (down(x).double() - down.bias.double())).mean(0)
    assert float(before.abs().max()) > 1e-4  # there was something to correct
    assert float(err.abs().max()) < 1e-6 * float(before.abs().max()) + 1e-7


def _block0_error(model, reference, n: int = 4) -> float:
    """Block 0's output against the float block 0's, mean squared, over the first ``n`` batches
    (block 0 sees the same embeddings in both models)."""
    outs = {}
    hooks = [m.model.layers[0].register_forward_hook(lambda mod, a, o, m=m: outs.setdefault(id(m), []).append(
        (o[0] if isinstance(o, tuple) else o).detach().double())) for m in (model, reference)]
    with torch.no_grad():
        for b in batches()[:n]:
            model(b, use_cache=False)
            reference(b, use_cache=False)
    for h in hooks:
        h.remove()
    got, want = torch.cat(outs[id(model)]), torch.cat(outs[id(reference)])
    return float((got - want).pow(2).mean())


def test_auto_shrink_takes_the_fraction_with_the_lowest_block_error(single_thread):
    """A slow reference for the search on one layer: the full correction ``c`` comes from
    ``shrink=1``; the search must leave ``f·c`` with ``f`` the fraction of 0, ½, 1 whose block-0
    output is closest to the float block's over the first ``GUARD_WINDOWS`` windows (batches of 4),
    scored here independently."""
    plan = lambda m: default_plan(m, parse_scheme("int3:channel"))  # noqa: E731

    def corrected(shrink):
        model = tiny_llama()
        recipe = Recipe((Stage(make("rtn")), Stage(make("bias-correction", shrink=shrink),
                                                    targets=r"layers\.0\.mlp\.down_proj")))
        report = calibrate(model, plan(model), recipe, batches(), progress=False)
        return model, report.stages[1].blocks[0]

    full, _ = corrected(1)
    auto, info = corrected("auto")
    c = full.model.layers[0].mlp.down_proj.bias.detach().clone()
    reference, scores = tiny_llama(), {}
    for f in (0.0, 0.5, 1.0):
        with torch.no_grad():
            full.model.layers[0].mlp.down_proj.bias.copy_(f * c)
        scores[f] = _block0_error(full, reference, n=-(-GUARD_WINDOWS // 4))
    chosen = info["shrink"]["model.layers.0.mlp.down_proj"]
    assert chosen == min(scores, key=scores.get)
    if chosen:
        assert torch.allclose(auto.model.layers[0].mlp.down_proj.bias, chosen * c, atol=1e-7)
    assert info["loss_after"] <= info["loss_before"]
    if chosen == 0:  # a layer left alone keeps no added bias
        assert auto.model.layers[0].mlp.down_proj.bias is None
    assert abs(info["loss_after"] - scores[chosen]) <= 1e-5 * scores[chosen]
    assert abs(info["loss_before"] - scores[0.0]) <= 1e-5 * scores[0.0]


def test_layers_that_take_none_of_their_correction_get_no_bias(single_thread):
    model = tiny_llama()
    report = calibrate(model, default_plan(model, parse_scheme("int3:channel")), "rtn+bias-correction", batches(),
                       progress=False)
    taken = {k: f for b in report.stages[1].blocks for k, f in b["shrink"].items()}
    assert 0.0 in taken.values() and set(taken.values()) <= {0.0, 0.5, 1.0}  # measured: 1 of 14 takes none
    modules = dict(model.named_modules())
    for key, fraction in taken.items():
        assert (modules[key].bias is None) == (fraction == 0), key
    zero = tiny_llama()
    recipe = Recipe((Stage(make("rtn")), Stage(make("bias-correction", shrink=0))))
    calibrate(zero, default_plan(zero, parse_scheme("int3:channel")), recipe, batches(), progress=False)
    assert all(getattr(m, "bias", None) is None for m in zero.modules() if isinstance(m, torch.nn.Linear))


def test_bad_shrink_is_refused():
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(LowbitError, match="bias-correction shrink must be 'auto' or a number in"):
            make("bias-correction", shrink=bad)
    assert make("bias-correction").shrink == "auto" and make("bias-correction").float_targets
    assert not make("bias-correction", shrink=0.5).float_targets


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_bias_correction_lowers_the_models_error(method, single_thread):
    held_out = torch.randint(0, families.V, (16, 48), generator=torch.Generator().manual_seed(9))
    plain, corrected = tiny_llama(), tiny_llama()
    calibrate(plain, default_plan(plain, parse_scheme("int3:channel")), method, batches(), progress=False)
    report = calibrate(corrected, default_plan(corrected, parse_scheme("int3:channel")), f"{method}+bias-correction",
                       batches(), progress=False)
    assert all(len(b["layers"]) == 7 for b in report.stages[1].blocks)
    # measured: rtn 4.26e-4 -> 3.74e-4, gptq 2.96e-4 -> 2.65e-4
    assert kl_to_float(corrected, held_out) < 0.93 * kl_to_float(plain, held_out)


def test_new_biases_are_saved_and_loaded(tmp_path, single_thread):
    model = tiny_llama()
    calibrate(model, default_plan(model, parse_scheme("int4:g32")), "rtn+bias-correction", batches(2), progress=False)
    x = batches(1, seed=3)[0]
    with torch.no_grad():
        before = model(x).logits
    lowbit.save(model, tmp_path / "bc")
    for packed in (False, True):
        loaded = lowbit.load(tmp_path / "bc", packed=packed)
        assert loaded.model.layers[0].mlp.down_proj.bias is not None
        with torch.no_grad():
            out = loaded(x).logits
        assert torch.equal(out, before) if not packed else torch.allclose(out, before, atol=0.05)
    from transformers import AutoModelForCausalLM  # transformers' own loader creates the added biases too

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "bc").eval()
    assert hf.model.layers[0].mlp.down_proj.bias is not None
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, before, atol=0.05)


def test_alone_or_before_a_quantizer_it_is_refused():
    model = tiny_llama()
    with pytest.raises(LowbitError, match="no stage of bias-correction produces it"):
        calibrate(model, default_plan(model, parse_scheme("int4:g32")), "bias-correction", batches(1), progress=False)
    with pytest.raises(LowbitError, match="put it after a quantizing stage"):
        calibrate(tiny_llama(), default_plan(model, parse_scheme("int4:g32")), "bias-correction+rtn", batches(1),
                  progress=False)


def test_kill_9_then_resume_gives_identical_bytes(run, tiny_llama_dir, tmp_path):
    import json
    import os
    import subprocess
    sys.path.insert(0, str(Path(__file__).parent))
    from cli_kill import KILL_AFTER_FIRST_BLOCK, files

    args = ("--method", "rtn+bias-correction", "--scheme", "int3:channel", "--samples", "4", "--seq-len", "32",
            "--batch-size", "2")
    assert run("quantize", str(tiny_llama_dir), "--out", str(tmp_path / "ref"), *args).returncode == 0
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_BLOCK, "quantize", str(tiny_llama_dir),
                             "--out", str(out), *args], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert json.loads((tmp_path / "out.partial" / "state.json").read_text())["done"] == 1
    resumed = run("quantize", str(tiny_llama_dir), "--out", str(out), *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert files(out) == files(tmp_path / "ref")


def test_exports_that_cannot_store_added_biases_refuse_them(tmp_path, single_thread):
    from lowbit.export import export

    model = tiny_llama()
    calibrate(model, default_plan(model, parse_scheme("uint4:g32")), "rtn+bias-correction", batches(1), progress=False)
    added = len(added_biases(model))  # the layers that took some of their correction
    assert added > 0
    lowbit.save(model, tmp_path / "bc")
    for target in ("compressed-tensors", "gguf"):
        with pytest.raises(LowbitError, match=f"{target} cannot store the biases bias correction added to {added} layers"):
            export(tmp_path / "bc", target, tmp_path / target)
        assert not (tmp_path / target).exists()
