"""SparseGPT: the column loop against a slow float64 reference written from the paper (explicit
inverse-Hessian elimination, no lazy blocks), exact properties under an identity Hessian, GPTQ
keeping an earlier stage's mask, and the method through the engine and the plan."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.algorithms._hessian import HessianStats
from lowbit.algorithms.gptq import gptq
from lowbit.algorithms.sparsegpt import sparsegpt
from lowbit.algorithms.wanda import keep_mask
from lowbit.errors import LowbitError
from lowbit.nn.reference import masks, quantized_tensors
from lowbit.quantizer import quantize_matrix
from lowbit.scheme import SparsitySpec
from lowbit.schemes import parse_scheme

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import families  # noqa: E402
from families import V  # noqa: E402

HALF = SparsitySpec("unstructured", 0.5)
TWO_FOUR = SparsitySpec("nm", n=2, m=4)


def problem(rows=24, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(512, cols, generator=g) @ torch.randn(cols, cols, generator=g) / cols ** 0.5  # correlated
    H = 2 * X.T @ X / X.shape[0]
    return torch.randn(rows, cols, generator=g), H


def slow_sparsegpt(W, H, sparsity, damp, block):
    """From the paper, in float64: Hinv = (H + λI)⁻¹; visit columns in order; when column j is
    visited, [H⁻¹]_jj is the current (already eliminated) diagonal; a pruned weight's target is 0;
    the error (w_j − q_j)/[H⁻¹]_jj moves the later columns by −err·[H⁻¹]_{j,j+1:}; then column j is
    eliminated from H⁻¹ (Gaussian elimination). Masks: at each block start, the lowest
    w²/[H⁻¹]_jj over the block (diagonal as it will be when each column is reached); for N:M, in
    each run of M, per row, the M−N lowest, chosen when the run's first column is reached."""
    W = W.double().clone()
    H = H.double().clone()
    cols = H.shape[0]
    H += damp * H.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    diag_at_visit, E = torch.empty(cols, dtype=torch.float64), Hinv.clone()
    for j in range(cols):  # the diagonal each column will have when it is reached
        diag_at_visit[j] = E[j, j]
        E = E - torch.outer(E[:, j], E[j, :]) / E[j, j]
    keep = torch.ones_like(W, dtype=torch.bool)
    for j in range(cols):
        if sparsity.kind == "unstructured" and j % block == 0:
            b = slice(j, min(j + block, cols))
            score = (W[:, b].square() / diag_at_visit[b]).T.reshape(-1)  # (b·rows,) column-major like the loop
            drop = round(score.numel() * sparsity.ratio)
            k = torch.ones(score.numel(), dtype=torch.bool)
            k[torch.sort(score, stable=True).indices[:drop]] = False
            keep[:, b] = k.reshape(-1, W.shape[0]).T
        if sparsity.kind == "nm" and j % sparsity.m == 0:
            b = slice(j, j + sparsity.m)
            score = W[:, b].square() / diag_at_visit[b]
            keep[:, b] = keep_mask(score, sparsity)
        d = Hinv[j, j]
        q = W[:, j] * keep[:, j]
        err = (W[:, j] - q) / d
        W[:, j] = q
        W[:, j + 1:] -= torch.outer(err, Hinv[j, j + 1:])
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return W, keep


@pytest.mark.parametrize("sparsity", [HALF, SparsitySpec("unstructured", 0.7), TWO_FOUR, SparsitySpec("nm", n=4, m=8)])
def test_matches_a_slow_float64_reference(sparsity):
    W, H = problem()
    got = sparsegpt(W, H, sparsity, damp=0.01, block_size=16)
    ref, keep = slow_sparsegpt(W, H, sparsity, 0.01, 16)
    assert torch.equal(got.keep, keep)
    torch.testing.assert_close(got.weight, ref.float(), rtol=1e-4, atol=1e-4)
    assert torch.equal(got.weight == 0, ~keep)


def test_identity_hessian_is_magnitude_pruning_per_block_and_per_run():
    W, _ = problem(16, 64)
    eye = torch.eye(64)
    r = sparsegpt(W, eye, TWO_FOUR, damp=0.0)
    assert torch.equal(r.keep, keep_mask(W.abs(), TWO_FOUR)) and torch.equal(r.weight, W * r.keep)
    r = sparsegpt(W, eye, HALF, damp=0.0, block_size=64)  # one block: the lowest half of the whole layer
    order = torch.sort(W.abs().T.reshape(-1), stable=True).indices[:W.numel() // 2]
    expect = torch.ones(W.numel(), dtype=torch.bool)
    expect[order] = False
    assert torch.equal(r.keep, expect.reshape(64, 16).T) and torch.equal(r.weight, W * r.keep)


def test_joint_with_identity_hessian_is_round_to_nearest_on_the_kept_weights():
    W, _ = problem(16, 64)
    spec = parse_scheme("uint4:g32")
    r = sparsegpt(W, torch.eye(64), TWO_FOUR, spec, damp=0.0)
    codes, scale, zero = quantize_matrix(W, spec)
    assert torch.equal(r.codes[r.keep], codes[r.keep]) and torch.equal(r.scale, scale)


def test_lower_layer_error_than_magnitude_and_wanda():
    for seed in range(3):
        W, H = problem(32, 128, seed)

        def err(Wq):
            d = (W - Wq).double()
            return float(torch.einsum("ij,jk,ik->", d, H.double(), d))

        for sp in (HALF, TWO_FOUR):
            s = err(sparsegpt(W, H, sp).weight)
            assert s < err(W * keep_mask(W.abs(), sp)) and s < err(W * keep_mask(W.abs() * H.diagonal().sqrt(), sp))


def test_gptq_keeps_a_given_mask_and_an_all_true_mask_changes_nothing():
    W, H = problem(16, 64)
    spec = parse_scheme("uint4:g32")
    keep = keep_mask(W.abs(), TWO_FOUR)
    plain = gptq(W, H, spec)
    same = gptq(W, H, spec, keep=torch.ones_like(keep))
    assert torch.equal(plain.codes, same.codes) and plain.loss == same.loss
    joint = sparsegpt(W, H, TWO_FOUR, spec, damp=0.01)  # given SparseGPT's own mask, GPTQ is the same loop
    fixed = gptq(W, H, spec, keep=joint.keep, damp=0.01, act_order=False, static_groups=False)
    assert torch.equal(fixed.codes, joint.codes) and torch.equal(fixed.scale, joint.scale)
    eye = gptq(W, torch.eye(64), spec, keep=keep, damp=0.0, act_order=False)
    codes, *_ = quantize_matrix(W, spec)
    assert torch.equal(eye.codes[keep], codes[keep])  # identity H: pruning moves nothing
    with pytest.raises(LowbitError, match="keep-mask must be bool of the weight's shape"):
        gptq(W, H, spec, keep=keep[:, :8])


def test_bad_input_is_refused():
    W, H = problem(8, 30)
    with pytest.raises(LowbitError, match="2:4 needs the input width to be a multiple of 4, but this layer has 30"):
        sparsegpt(W, H, TWO_FOUR)
    with pytest.raises(LowbitError, match="cannot use act_order"):
        sparsegpt(W, H, TWO_FOUR, act_order=True)
    with pytest.raises(LowbitError, match="not channel sparsity"):
        sparsegpt(W, H, SparsitySpec("channel", 0.5))


def tiny_llama():
    torch.manual_seed(0)
    return families.llama().eval()


def windows(n=8, t=16):
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("scheme", ["s=50%", "s=2:4"])
def test_engine_prunes_every_layer_exactly(scheme):
    model = lowbit.quantize(tiny_llama(), scheme, method="sparsegpt", calib=windows(), progress=False)
    found = {f"{n}.{p}": m for n, p, m in masks(model)}
    assert len(found) == 14
    for key, keep in found.items():
        w = model.get_submodule(key.rpartition(".")[0]).weight
        assert torch.equal(w == 0, ~keep) and int((~keep).sum()) == keep.numel() // 2, key
        if scheme == "s=2:4":
            assert torch.equal(keep.reshape(keep.shape[0], -1, 4).sum(-1), torch.full((keep.shape[0], keep.shape[1] // 4), 2))


def test_engine_joint_mode_and_sparsegpt_then_gptq(monkeypatch):
    joint = lowbit.quantize(tiny_llama(), "uint4:g16+s=2:4", method="sparsegpt", calib=windows(), progress=False)
    found = list(quantized_tensors(joint))
    assert len(found) == 14 and all(qt.mask is not None for *_, qt, _ in [(None,) + f[2:] for f in found])
    from lowbit.modifiers.gptq import GPTQ

    seen = []
    original = GPTQ.solve_layer

    def spy(self, W, stats, scheme, key, global_scale=None, keep=None):
        seen.append(keep is not None and not bool(keep.all()))
        return original(self, W, stats, scheme, key, global_scale, keep)

    monkeypatch.setattr(GPTQ, "solve_layer", spy)
    two = lowbit.quantize(tiny_llama(), "uint4:g16+s=2:4", method="sparsegpt+gptq", calib=windows(), progress=False)
    assert seen == [True] * 14  # the plan left the weight to gptq, which got each layer's mask
    for name, param, qt, _ in quantized_tensors(two):
        w = qt.dequantize(torch.float32)
        assert qt.mask is not None and torch.equal(w[~qt.mask], torch.zeros(int((~qt.mask).sum())))


def test_plan_refuses_an_nm_pattern_that_does_not_divide_a_width():
    with pytest.raises(LowbitError, match=r"stage 1 \(sparsegpt\): N:M sparsity 3:5 needs input widths that are "
                                          r"multiples of 5, but model.layers.0.* has \d+ inputs"):
        lowbit.quantize(tiny_llama(), "s=3:5", method="sparsegpt", calib=windows(), progress=False)


def test_sparse_quantized_tensor_stores_kept_codes_only(tmp_path):
    from lowbit.packing import packed_nbytes

    model = lowbit.quantize(tiny_llama(), "uint4:g16+s=2:4", method="sparsegpt", calib=windows(), progress=False)
    name, param, qt, _ = next(iter(quantized_tensors(model)))
    stored = qt.to_tensors()
    kept = int(qt.mask.sum())
    assert kept == qt.numel // 2 and stored["codes"].numel() == packed_nbytes(kept, 4)
    expect = 4 * kept + qt.numel + 16 * qt.scale.numel() + 4 * qt.zero.numel()  # codes, mask, fp16 scales, int zeros
    assert qt.nbits() == expect and qt.bits_per_weight() == 4.25  # dense uint4 g16 stores 5.25
    lowbit.save(model, tmp_path / "s")
    again = {f"{n}.{p}": q for n, p, q, _ in quantized_tensors(lowbit.load(tmp_path / "s", packed=False))}
    back = again[f"{name}.{param}"]
    assert torch.equal(back.dequantize(), qt.dequantize()) and torch.equal(back.codes()[back.mask], qt.codes()[qt.mask])
