"""LoRC (ZeroQuant-V2 low-rank compensation): Eckart–Young exactness against numpy's singular values,
monotonicity in the rank, factor storage (int8 against a slow per-component loop), exact bit
accounting, refusals, and the method after rtn, hqq, nupes and gptq on a tiny Llama."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.algorithms.lorc import lorc, lowrank_factors, store_factors
from lowbit.errors import LowbitError
from lowbit.modifiers import make
from lowbit.nn.reference import quantized_tensors
from lowbit.qtensor import matrix_view
from lowbit.recipe.recipe import Recipe, Stage

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import families  # noqa: E402
from families import V  # noqa: E402


def error_matrix(rows: int = 48, cols: int = 80, seed: int = 0) -> torch.Tensor:
    """A random (rows, cols) float32 matrix with a decaying spectrum (as quantization errors of
    structured weights have) plus noise."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
    Vt, _ = torch.linalg.qr(torch.randn(cols, k, generator=g))
    s = torch.logspace(0, -2, k)
    return (U * s) @ Vt.t() + 1e-3 * torch.randn(rows, cols, generator=g)


def tail(E: torch.Tensor, r: int) -> float:
    """sqrt(Σ_{i>r} σ_i²) from numpy's SVD in float64 (the independent reference)."""
    s = np.linalg.svd(E.double().numpy(), compute_uv=False)
    return float(np.sqrt((s[r:] ** 2).sum()))


@pytest.mark.parametrize("r", [1, 4, 16, 47])
def test_error_equals_the_singular_value_tail(r):
    E = error_matrix()
    A, B = lowrank_factors(E, r)
    assert A.shape == (48, r) and B.shape == (r, 80) and A.dtype == B.dtype == torch.float32
    got = float(torch.linalg.norm(E.double() - A.double() @ B.double()))
    assert got == pytest.approx(tail(E, r), rel=1e-4, abs=1e-6)
    s = np.linalg.svd(E.double().numpy(), compute_uv=False)[:r]  # balanced split: AᵀA = BBᵀ = Σ_r
    assert np.allclose(torch.diag(A.t() @ A).numpy(), s, rtol=1e-4)
    assert np.allclose(torch.diag(B @ B.t()).numpy(), s, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(3, 24), cols=st.integers(3, 24), seed=st.integers(0, 10_000))
def test_error_is_monotone_in_the_rank_and_exact_at_every_rank(rows, cols, seed):
    E = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    errors = []
    for r in range(1, min(rows, cols)):
        A, B = lowrank_factors(E, r)
        errors.append(float(torch.linalg.norm(E.double() - A.double() @ B.double())))
        assert errors[-1] == pytest.approx(tail(E, r), rel=1e-4, abs=1e-5)
    assert all(b <= a + 1e-5 for a, b in zip(errors, errors[1:]))


def slow_int8(A: torch.Tensor, B: torch.Tensor):
    """From the definition, one component at a time: symmetric int8 with scale max|·|/127."""
    a, b, s = torch.zeros(A.shape, dtype=torch.int8), torch.zeros(B.shape, dtype=torch.int8), []
    for k in range(A.shape[1]):
        sa, sb = A[:, k].abs().max() / 127, B[k].abs().max() / 127
        a[:, k] = torch.round(A[:, k] / sa).to(torch.int8)
        b[k] = torch.round(B[k] / sb).to(torch.int8)
        s.append(sa * sb)
    return a, b, torch.stack(s)


def test_factor_storage_and_int8_against_a_slow_loop():
    E = error_matrix()
    A, B = lowrank_factors(E, 8)
    exact = A @ B
    for dtype, tol in (("float32", 1e-7), ("float16", 2e-3), ("bfloat16", 1.5e-2), ("int8", 2e-2)):
        a, b, scale = store_factors(A, B, dtype)
        assert a.dtype == b.dtype == getattr(torch, dtype) and (scale is None) == (dtype != "int8")
        prod = a.float() * (1 if scale is None else scale) @ b.float()
        assert float(torch.linalg.norm(prod - exact) / torch.linalg.norm(exact)) < tol
    a, b, scale = store_factors(A, B, "int8")
    ref = slow_int8(A, B)
    assert torch.equal(a, ref[0]) and torch.equal(b, ref[1]) and torch.allclose(scale, ref[2], rtol=1e-6)


def test_same_input_same_bytes_and_a_fixed_sign():
    E = error_matrix(seed=3)
    one, two = lorc(E, 6, "int8"), lorc(E.clone(), 6, "int8")
    assert all(torch.equal(x, y) for x, y in zip(one, two))
    A, _ = lowrank_factors(E, 6)
    assert (A.gather(0, A.abs().argmax(0)[None]) > 0).all()  # each component's largest entry of A is positive


@pytest.mark.parametrize("rank", [0, -1, 48, 100, True, 2.0])
def test_bad_rank_refused(rank):
    with pytest.raises(LowbitError, match=rf"lorc rank {rank!r} does not fit this weight \(48x80\); use an integer "
                                          r"from 1 to 47"):
        lowrank_factors(error_matrix(), rank)


def test_bad_options_refused():
    with pytest.raises(LowbitError, match=r"lorc factor dtype 'int4' is not supported; use one of float16, "
                                          r"bfloat16, float32, int8"):
        make("lorc", dtype="int4")
    with pytest.raises(LowbitError, match=r"lorc rank must be a positive integer \(such as 8\), got 0"):
        make("lorc", rank=0)


# --- the method on a tiny Llama ---------------------------------------------------------------------------------
def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return families.llama().eval()


def windows(n: int = 8, t: int = 16) -> torch.Tensor:
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(0))


def quantized(method: str, scheme: str = "int3:g32", **options) -> torch.nn.Module:
    model = tiny_llama()
    calib = windows() if "gptq" in method else None
    lowbit.quantize(model, scheme, method, calib=calib, progress=False, **options)
    return model


def by_key(model) -> dict:
    return {f"{n}.{p}": qt for n, p, qt, _ in quantized_tensors(model)}


def logits_error(model) -> float:
    x = families.example_input("llama")
    return float((families.output(model, x) - families.output(tiny_llama(), x)).pow(2).mean())


def test_rtn_lorc_is_eckart_young_on_every_layer_and_improves_w3():
    floats = {f"{n}.weight": m.weight.detach() for n, m in tiny_llama().named_modules()
              if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    plain, corrected = quantized("rtn"), quantized("rtn+lorc", rank=8, dtype="float32")
    qplain, qcorr = by_key(plain), by_key(corrected)
    assert sorted(qcorr) == sorted(qplain) == sorted(floats) and len(qcorr) == 14
    for key, qt in qcorr.items():
        assert torch.equal(qt.packed, qplain[key].packed) and torch.equal(qt.scale, qplain[key].scale)
        W = matrix_view(floats[key], qt.layout)
        E = W - matrix_view(qplain[key].dequantize(), qt.layout)
        after = float(torch.linalg.norm(W - matrix_view(qt.dequantize(), qt.layout)))
        assert qt.rank == 8 and after == pytest.approx(tail(E, 8), rel=1e-4)
        assert after < float(torch.linalg.norm(E))
        rows, cols = qt.matrix_shape
        assert qt.nbits() == qplain[key].nbits() + 32 * 8 * (rows + cols)
    assert logits_error(corrected) < 0.8 * logits_error(plain)


def test_int8_factors_are_counted_and_close_to_fp16():
    fp16, int8 = by_key(quantized("rtn+lorc", rank=4)), by_key(quantized("rtn+lorc", rank=4, dtype="int8"))
    plain = by_key(quantized("rtn"))
    for key, qt in int8.items():
        rows, cols = qt.matrix_shape
        assert qt.lowrank_a.dtype == torch.int8 and qt.lowrank_scale.shape == (4,)
        assert qt.nbits() == plain[key].nbits() + 8 * 4 * (rows + cols) + 32 * 4
        assert fp16[key].nbits() == plain[key].nbits() + 16 * 4 * (rows + cols)
        ref = fp16[key].lowrank_term()
        assert float(torch.linalg.norm(qt.lowrank_term() - ref) / torch.linalg.norm(ref)) < 0.02


@pytest.mark.parametrize("method,scheme", [("hqq+lorc", "uint3_fz:g32"), ("nupes+lorc", "int3:g32"),
                                           ("gptq+lorc", "int3:g32")])
def test_after_every_quantizer_codes_unchanged_and_the_output_better(method, scheme):
    first = method.split("+")[0]
    plain, corrected = quantized(first, scheme), quantized(method, scheme, rank=8)
    qplain, qcorr = by_key(plain), by_key(corrected)
    assert sorted(qcorr) == sorted(qplain) and all(qt.rank == 8 for qt in qcorr.values())
    # LoRC only adds factors; under gptq, block 1 is calibrated on the corrected block 0's outputs
    same = [k for k in qcorr if first != "gptq" or ".layers.0." in k]
    assert len(same) >= 7 and all(torch.equal(qcorr[k].packed, qplain[k].packed) for k in same)
    assert logits_error(corrected) < logits_error(plain)


def test_a_tensor_no_earlier_stage_quantizes_is_refused():
    recipe = Recipe((Stage(make("rtn"), targets=r"mlp"), Stage(make("lorc"))))
    with pytest.raises(LowbitError, match=r"^stage 2 \(lorc\): no earlier stage quantizes "
                                          r"model\.layers\.0\.self_attn\.q_proj, and method lorc corrects a "
                                          r"quantized weight; put a quantizing method before it \(e\.g\. rtn\+lorc\)"):
        lowbit.quantize(tiny_llama(), "int3:g32", recipe, progress=False)
    with pytest.raises(LowbitError, match=r"^stage 1 \(lorc\): no earlier stage quantizes"):
        lowbit.quantize(tiny_llama(), "int3:g32", "lorc", progress=False)
    with pytest.raises(LowbitError, match=r"no earlier stage quantizes"):
        lowbit.quantize(tiny_llama(), "int3:g32", "lorc+rtn", progress=False)


@pytest.mark.parametrize("method", ["rtn+lorc+lorc", "gptq+lorc+lorc"])
def test_a_second_correction_of_the_same_tensor_is_refused_before_any_change(method):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(LowbitError, match=r"^stage 3 \(lorc\) would correct model\.layers\.0\.\S+ a second time "
                                          r"\(stage 2 already does\); .*raise its rank"):
        lowbit.quantize(model, "int3:g32", method, calib=calib if method.startswith("gptq") else None,
                        progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_rank_that_does_not_fit_is_refused_before_any_change():
    model = tiny_llama()
    with pytest.raises(LowbitError, match=r"lorc rank 32 does not fit model\.layers\.0\.self_attn\.k_proj "
                                          r"\(32x64\); use an integer from 1 to 31"):
        lowbit.quantize(model, "int3:g32", "rtn+lorc", rank=32, progress=False)
    assert not list(quantized_tensors(model))


def test_a_recipe_stage_with_targets():
    recipe = Recipe((Stage(make("rtn")), Stage(make("lorc", rank=2), targets=r"mlp\.down_proj")))
    model = tiny_llama()
    lowbit.quantize(model, "int3:g32", recipe, progress=False)
    ranks = {k: qt.rank for k, qt in by_key(model).items()}
    assert ranks["model.layers.1.mlp.down_proj.weight"] == 2 and ranks["model.layers.1.mlp.up_proj.weight"] == 0
    assert sum(ranks.values()) == 4


def test_tied_weights_stay_tied_and_share_one_correction():
    from lowbit.nn.reference import qtensors
    from lowbit.scheme import Rule
    from lowbit.schemes import parse_scheme

    model = tiny_llama()
    W = model.lm_head.weight.detach().clone()
    lowbit.quantize(model, [Rule(r"lm_head$|embed_tokens$", parse_scheme("int4:g32"))], "rtn+lorc", rank=4,
                    progress=False)
    head, emb = qtensors(model.lm_head)["weight"], qtensors(model.model.embed_tokens)["weight"]
    assert head is emb and head.rank == 4 and model.lm_head.weight is model.model.embed_tokens.weight
    plain = replace(head, lowrank_a=None, lowrank_b=None)
    assert float(torch.linalg.norm(W - head.dequantize())) < float(torch.linalg.norm(W - plain.dequantize()))


def test_data_free_lorc_holds_one_float_copy_at_a_time_and_matches_refining_afterwards(monkeypatch):
    """rtn+lorc corrects each tensor right after rounding it, not after every weight's float copy
    was kept until the LoRC stage; the tensors equal the stage-after-stage run's bit for bit."""
    from lowbit.engine import dataless
    from lowbit.nn.reference import _FLOATS

    real = dataless.refine_target

    def run(early: bool) -> tuple[torch.nn.Module, list[int]]:
        model, held = tiny_llama(), []

        def counting(m, target, module, scheme, report):
            held.append(sum(len(mod.__dict__.get(_FLOATS, {})) for mod in model.modules()))
            return real(m, target, module, scheme, report)

        with monkeypatch.context() as mp:
            mp.setattr(dataless, "refine_target", counting)
            if not early:  # the refining stage then corrects every tensor after rtn rounded them all
                mp.setattr(dataless._EarlyRefine, "refine", lambda self, target, module, solved, report: solved)
            lowbit.quantize(model, "int3:g32", "rtn+lorc", rank=4, progress=False)
        return model, held

    (ours, held), (theirs, held_late) = run(True), run(False)
    assert len(held) == 14 and max(held) == 1 and max(held_late) == 14, (held, held_late)
    a, b = by_key(ours), by_key(theirs)
    assert sorted(a) == sorted(b) and all(x.rank == 4 for x in a.values())
    for k in a:
        ta, tb = a[k].to_tensors(), b[k].to_tensors()
        assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta), k


def test_gptq_lorc_resumes_from_its_checkpoint_to_the_same_tensors(tmp_path, monkeypatch):
    """Killed after block 0, resumed: block 0's factors (int8, scales in the metadata) come back
    from the checkpoint and the result equals an uninterrupted run."""
    from lowbit.engine import checkpoint
    from lowbit.engine.runner import calibrate
    from lowbit.models.targets import default_plan
    from lowbit.schemes import parse_tensor_scheme

    scheme, batches = parse_tensor_scheme("int3:g32"), list(windows().split(4))
    recipe = Recipe((Stage(make("gptq")), Stage(make("lorc", rank=4, dtype="int8"))))
    ref = tiny_llama()
    calibrate(ref, default_plan(ref, scheme), recipe, batches, progress=False)
    done = checkpoint.RunDir.mark_done

    def stop_after_first(self, block):
        done(self, block)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.RunDir, "mark_done", stop_after_first)
    model = tiny_llama()
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, default_plan(model, scheme), recipe, batches, workdir=tmp_path / "run", fingerprint="f",
                  progress=False)
    monkeypatch.setattr(checkpoint.RunDir, "mark_done", done)
    model = tiny_llama()
    report = calibrate(model, default_plan(model, scheme), recipe, batches, workdir=tmp_path / "run",
                       fingerprint="f", resume=True, progress=False)
    assert report.resumed_from == 1
    want, got = by_key(ref), by_key(model)
    assert want.keys() == got.keys() and len(want) == 14
    for k, qt in want.items():
        assert got[k].rank == 4 and torch.equal(got[k].lowrank_scale, qt.lowrank_scale), k
        assert all(torch.equal(v, got[k].to_tensors()[r]) for r, v in qt.to_tensors().items()), k
