"""NUPES's data-driven mode (shared/papers/METHODS.md §1): the data-free result exactly when
untrained, a slow reference for the power rounding and its surrogate gradients, a learned
exponent and lower block errors when trained, the trained forward stored bit for bit,
deterministic, saved and reloaded identically, through the CLI, resumable. The paper check on
the digits-MLP is in ``tests/run/test_nupes_digits.py``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms.nupes_data import A_MIN, exponent, power_codes, power_fake_quantize
from lowbit.engine.runner import calibrate
from lowbit.errors import LowbitError
from lowbit.formats.grid import PowerFormat
from lowbit.models.targets import default_plan
from lowbit.modifiers import make
from lowbit.modifiers._nupes_data import PowerLinear
from lowbit.nn.reference import attach, quantized_tensors
from lowbit.qat.fakequant import initial_qparams
from lowbit.quantizer import pack_matrix
from lowbit.schemes import parse_scheme, parse_tensor_scheme

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import families  # noqa: E402
sys.path.insert(0, str(Path(__file__).parent))
from cli_kill import KILL_AFTER_FIRST_BLOCK, files  # noqa: E402
from test_lsq import batches, kl_to_float, same, tensors, tiny_llama  # noqa: E402

CLI = ("--scheme", "pow3_a0.5:channel", "--samples", "4", "--seq-len", "32", "--batch-size", "2")


def nupes_data(scheme: str, n_batches: int = 4, **options):
    model = tiny_llama()
    report = calibrate(model, default_plan(model, parse_tensor_scheme(scheme)), make("nupes", mode="data", **options),
                       batches(n_batches), progress=False)
    return model, report


def data_free(scheme: str):
    return lowbit.quantize(tiny_llama(), default_plan(tiny_llama(), parse_tensor_scheme(scheme)), method="nupes",
                           progress=False)


@pytest.mark.parametrize("scheme", ["pow3_a0.5:channel", "pow4_a0.5:g48", "int4:g32", "pow3_a0.5:g32:mse"])
def test_untrained_is_the_data_free_result_bit_for_bit(scheme, single_thread):
    """g48 leaves a partial group of 16 of the 64 inputs; int4 becomes a power grid as in the
    data-free mode; :mse searches the clip with the searched exponent."""
    model, report = nupes_data(scheme, steps=0)
    free = data_free(scheme)
    assert len(tensors(model)) == 14 and same(tensors(model), tensors(free))
    x = batches(1, seed=7)[0]
    with torch.no_grad():
        assert torch.equal(model(x).logits, free(x).logits)
    assert all(b["kept"] == "start" and b["loss_after"] == b["loss_before"] for b in report.stages[0].blocks)


def _reference(W, S, bits, a, v):
    """The power rounding from its definition, one weight at a time in float64 (per channel)."""
    qmax = 2 ** (bits - 1) - 1
    out, codes = torch.empty_like(W), torch.empty(W.shape, dtype=torch.uint8)
    for i in range(W.shape[0]):
        s = float(S[i, 0])
        for j in range(W.shape[1]):
            w = float(W[i, j])
            t = (abs(w) / s) ** a * qmax * (1 if w > 0 else -1 if w < 0 else 0) + float(v[i, j])
            q = max(-qmax, min(qmax, round(t)))  # Python's round: ties to even
            codes[i, j] = q + 2 ** (bits - 1)
            out[i, j] = (1 if q > 0 else -1 if q < 0 else 0) * (abs(q) / qmax) ** (1 / a) * s
    return out, codes


def test_rounding_matches_a_slow_reference_and_what_is_stored():
    torch.manual_seed(0)
    spec = parse_scheme("pow3_a0.5:channel")
    W = torch.randn(6, 40)
    S = initial_qparams(W, spec)[0]
    v = 3 * torch.rand(6, 40) - 1.5  # up to a level and a half either way: not only up or down
    a = exponent(torch.tensor(0.3, dtype=torch.float64), 0.5)
    got = power_fake_quantize(W, spec, S, a, v)
    ref, ref_codes = _reference(W, S, 3, float(a), v)
    codes = power_codes(W, spec, S, float(a), v)
    assert torch.equal(codes, ref_codes) and torch.allclose(got, ref, atol=1e-6, rtol=0)
    assert (codes.int() - power_codes(W, spec, S, float(a)).int()).abs().max() >= 2  # moved over two levels
    stored = pack_matrix(replace_a(spec, float(a)), (6, 40), "rows", codes, S, None, None)
    assert torch.equal(stored.dequantize(), got)  # what is stored is what was trained


def replace_a(spec, a):
    return replace(spec, format=PowerFormat(spec.format.bits, a))


def test_gradients_are_the_stated_surrogates():
    """∂x̂/∂v is the grid's local spacing (never 0, even on code 0); ∂x̂/∂a is LSQ's rule for the
    exponent, checked against its formula in float64, and vanishes on weights that sit exactly
    on their levels."""
    torch.manual_seed(1)
    spec = parse_scheme("pow3_a0.5:channel")
    W = torch.randn(4, 32)
    S = initial_qparams(W, spec)[0]
    u = torch.zeros((), dtype=torch.float64, requires_grad=True)
    v = torch.zeros_like(W, requires_grad=True)
    a = exponent(u, 0.6)
    g = torch.randn(4, 32)
    (power_fake_quantize(W, spec, S, a, v) * g).sum().backward()
    qmax, A = 3, 0.6
    q = power_codes(W, spec, S, A).double() - 4
    D = lambda k: torch.sign(k) * (k.abs() / qmax) ** (1 / A) * S.double()  # noqa: E731
    up, down = (q + 1).clamp(-qmax, qmax), (q - 1).clamp(-qmax, qmax)
    spacing = (D(up) - D(down)) / (up - down)
    assert torch.allclose(v.grad.double(), g.double() * spacing, rtol=1e-5, atol=0) and (v.grad[q == 0] != 0).all()
    r, sgn = W.double().abs() / S.double(), torch.sign(W.double())
    dlevel_da = torch.where(q != 0, -D(q) * torch.log((q.abs() / qmax).clamp_min(1e-300)) / A ** 2, 0.0)
    dD_dq = torch.where(q != 0, S.double() / (A * qmax) * (q.abs() / qmax) ** (1 / A - 1), 0.0)
    dt_da = sgn * r ** A * torch.log(r) * qmax
    sigma = 0.6 * 0.4  # dσ/dθ at σ = 0.6
    expected = float((g.double() * (dlevel_da + dD_dq * dt_da)).sum()) * sigma
    assert u.grad is not None and float(u.grad) == pytest.approx(expected, rel=1e-4)
    on_levels = power_fake_quantize(W, spec, S, exponent(torch.zeros((), dtype=torch.float64), 0.6), v).detach()
    u2 = torch.zeros((), dtype=torch.float64, requires_grad=True)
    (power_fake_quantize(on_levels, spec, S, exponent(u2, 0.6), v.detach()) * g).sum().backward()
    assert abs(float(u2.grad)) < 1e-4 * abs(expected)


def test_exponent_parametrisation_starts_exactly_and_stays_in_range():
    for a0 in (0.2, 0.5, 0.6180339887, 1.0):
        assert float(exponent(torch.zeros((), dtype=torch.float64), a0)) == a0
    assert float(exponent(torch.tensor(-50.0), 0.5)) == A_MIN and float(exponent(torch.tensor(50.0), 1.0)) == 1.0


def test_frozen_tensor_reproduces_the_trained_forward_bit_for_bit():
    torch.manual_seed(2)
    linear = nn.Linear(48, 24)
    spec = replace_a(parse_scheme("pow3_a0.5:g16"), 0.7)
    layer = PowerLinear(linear, spec, linear.weight.detach().clone(), "rows")
    with torch.no_grad():
        layer.v.copy_(2 * torch.rand_like(layer.v) - 1)
        layer.u.fill_(0.4)
    x = torch.randn(5, 48)
    with torch.no_grad():
        trained = layer(x)
    qt = layer.freeze()
    assert qt.spec.format == PowerFormat(3, layer.a) and layer.a != 0.7
    attach(linear, "weight", qt, torch.float32)
    with torch.no_grad():
        assert torch.equal(linear(x), trained)


def test_exponents_move_and_block_losses_drop(single_thread):
    """And the model's KL to the float model on held-out windows drops below the data-free mode's."""
    held_out = torch.randint(0, families.V, (32, 48), generator=torch.Generator().manual_seed(9))
    model, report = nupes_data("pow3_a0.5:channel", steps=60)
    for block in report.stages[0].blocks:
        assert block["kept"] == "learned" and block["loss_after"] < 0.5 * block["loss_before"]
        assert block["steps"] == 60 and len(block["layers"]) == 7
        assert max(abs(end - start) for start, end in block["exponents"].values()) > 0.02
    stored = {name: qt.spec.format.a for name, _, qt, _ in quantized_tensors(model)}
    learned = {k: end for b in report.stages[0].blocks for k, (_, end) in b["exponents"].items()}
    assert stored == learned  # each tensor's spec records its learned exponent
    assert kl_to_float(model, held_out) < 0.8 * kl_to_float(data_free("pow3_a0.5:channel"), held_out)


def test_same_inputs_same_bytes(single_thread):
    a, _ = nupes_data("pow3_a0.5:channel", n_batches=3, steps=5)
    b, _ = nupes_data("pow3_a0.5:channel", n_batches=3, steps=5)
    assert same(tensors(a), tensors(b)) and not same(tensors(a), tensors(data_free("pow3_a0.5:channel")))


def test_save_and_load_give_the_same_outputs(tmp_path, single_thread):
    model, _ = nupes_data("pow3_a0.5:channel", steps=5)
    x = batches(1, seed=3)[0]
    with torch.no_grad():
        before = model(x).logits
    lowbit.save(model, tmp_path / "nd")
    loaded = lowbit.load(tmp_path / "nd", packed=False)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, before)
    assert same(tensors(loaded), tensors(model))


def test_mode_decides_data_and_bad_options_are_refused():
    assert not make("nupes").needs_data and make("nupes", mode="data").needs_data
    assert make("nupes", mode="data").float_targets and make("nupes", mode="data").has_block_solve
    assert make("nupes").has_layer_solve and not make("nupes").has_block_solve
    for options, message in (({"mode": "learned"}, "nupes mode 'learned' is unknown; use one of free, data"),
                             ({"steps": -1}, "steps must be an integer >= 0"),
                             ({"lr": -1.0}, "nupes lr must be a number >= 0"),
                             ({"exponent_lr": "x"}, "nupes exponent_lr must be a number >= 0")):
        with pytest.raises(LowbitError, match=message):
            make("nupes", **options)
    with pytest.raises(LowbitError, match="needs calibration data"):
        lowbit.quantize(tiny_llama(), "pow3_a0.5:channel", method="nupes", mode="data", progress=False)


def test_methods_table_says_when_nupes_needs_data(run):
    out = run("methods").stdout
    line = next(row for row in out.splitlines() if row.strip("│ ").startswith("nupes"))
    assert "with --mode data" in line and "--mode" in out and "--exponent-lr" in out


def test_cli_method_and_recipe_give_the_same_bytes(run, tiny_llama_dir, tmp_path):
    by_method = run("quantize", str(tiny_llama_dir), "--out", str(tmp_path / "m"), "--method", "nupes",
                    "--mode", "data", "--steps", "3", *CLI)
    assert by_method.returncode == 0, by_method.stderr
    assert "layers solved │ 14" in by_method.stdout and "fallback" not in by_method.stdout
    recipe = tmp_path / "nd.yaml"
    recipe.write_text("stages:\n  - method: nupes\n    mode: data\n    steps: 3\n")
    by_recipe = run("quantize", str(tiny_llama_dir), "--out", str(tmp_path / "r"), "--recipe", str(recipe),
                    *CLI, "--report", str(tmp_path / "report.json"))
    assert by_recipe.returncode == 0, by_recipe.stderr
    assert files(tmp_path / "m") == files(tmp_path / "r")
    blocks = json.loads((tmp_path / "report.json").read_text())["stages"][0]["blocks"]
    assert len(blocks) == 2 and all(b["steps"] == 3 and b["loss_after"] <= b["loss_before"] for b in blocks)
    assert all(len(b["exponents"]) == 7 for b in blocks)


def test_kill_9_then_resume_gives_identical_bytes(run, tiny_llama_dir, tmp_path):
    args = ("--method", "nupes", "--mode", "data", "--steps", "3", *CLI)
    assert run("quantize", str(tiny_llama_dir), "--out", str(tmp_path / "ref"), *args).returncode == 0
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_BLOCK, "quantize", str(tiny_llama_dir),
                             "--out", str(out), *args], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    resumed = run("quantize", str(tiny_llama_dir), "--out", str(out), *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at block" in resumed.stdout and files(out) == files(tmp_path / "ref")


def test_calibration_data_without_the_data_mode_is_refused_with_a_hint():
    message = "takes no calibration data; drop calib, or use nupes with --mode data, which takes it"
    with pytest.raises(LowbitError, match=message):
        lowbit.quantize(tiny_llama(), "pow3_a0.5:channel", method="nupes", calib=batches(1)[0], progress=False)


@pytest.mark.parametrize("family", ["gpt2", "mixtral"])
def test_untrained_is_the_data_free_result_on_conv1d_and_fused_experts(family, single_thread):
    """GPT-2's Conv1D (in, out) layout is trained like a Linear; Mixtral's fused experts cannot be
    wrapped and keep the data-free solution (their searched exponent), reported as fallbacks."""
    def build():
        torch.manual_seed(0)
        return getattr(families, family)().eval()

    scheme = parse_tensor_scheme("pow3_a0.5:channel")
    model = build()
    report = calibrate(model, default_plan(model, scheme), make("nupes", mode="data", steps=0), batches(2),
                       progress=False)
    free = lowbit.quantize(build(), default_plan(build(), scheme), method="nupes", progress=False)
    assert same(tensors(model), tensors(free))
    rounded = [k for b in report.stages[0].blocks for k in b.get("rounded_to_nearest", [])]
    assert bool(rounded) == (family == "mixtral") and all(".experts." in k for k in rounded)


def test_a_tensor_outside_the_blocks_gets_the_data_free_exponent_search(single_thread):
    """The untied lm_head has no block data: it is solved by the data-free mode (its searched
    exponent), not rounded to nearest on the scheme's own exponent, and the report says so."""
    from lowbit.scheme import Rule

    scheme = parse_tensor_scheme("pow3_a0.5:channel")
    rules = [Rule(r"lm_head$", scheme)] + default_plan(tiny_llama(), scheme)
    model = tiny_llama()
    report = calibrate(model, rules, make("nupes", mode="data", steps=2), batches(2), progress=False)
    free = lowbit.quantize(tiny_llama(), [Rule(r"lm_head$", scheme)], method="nupes", progress=False)
    assert same({"h": tensors(model)["lm_head"]}, {"h": tensors(free)["lm_head"]})
    head = next(qt for name, _, qt, _ in quantized_tensors(model) if name == "lm_head")
    assert head.spec.format.a != 0.5  # the search moved the exponent: rounding to nearest keeps 0.5
    assert any(f.startswith("lm_head: outside the repeated blocks, solved by nupes's data-free method")
               for f in report.fallbacks), report.fallbacks
