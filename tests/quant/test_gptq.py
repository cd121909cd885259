"""GPTQ and its Hessian helpers: identity H is RTN, correlated inputs beat RTN, every format.

Small matrices only; reconstructions go through ``pack_matrix(...).dequantize()`` so that
the QuantizedTensor round trip is checked too.
"""
from __future__ import annotations

import pytest
import torch

from lowbit.algorithms._hessian import FIRST_RETRY_DAMP, HessianStats, inverse_cholesky
from lowbit.algorithms.gptq import DEFAULT_DAMP, GPTQ, gptq
from lowbit.errors import LowbitError
from lowbit.formats import all_formats, get_format
from lowbit.quantizer import choose_qparams, pack_matrix, quantize_matrix
from lowbit.spec import PerBlock, PerChannel, PerGroup, PerTensor, QuantSpec

FORMATS = all_formats()
NAMES = list(FORMATS)


@pytest.fixture(autouse=True, scope="module")
def _single_thread(single_thread):
    """Every test here runs on one thread (see ``single_thread`` in tests/conftest.py)."""


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def granularities(fmt) -> list:
    """Channel, a partial last group, partial 2-D tiles, tensor; fixed-block formats: their block."""
    if fmt.fixed_block:
        return [PerGroup(fmt.fixed_block)]
    return [PerChannel(), PerGroup(8), PerBlock(3, 8), PerTensor()]


def shape_for(fmt) -> tuple[int, int]:
    """7 rows (tiles of 3 leave 1), 20 columns (groups of 8 leave 4); fixed blocks: 1.5 blocks."""
    return (5, fmt.fixed_block * 3 // 2) if fmt.fixed_block else (7, 20)


def group_for(fmt) -> PerGroup:
    return PerGroup(fmt.fixed_block or 16)


def rtn(W: torch.Tensor, spec: QuantSpec):
    gs = spec.format.global_scale(W)
    return (*quantize_matrix(W, spec, gs), gs)


def reconstruct(spec: QuantSpec, codes, scale, zero, gs) -> torch.Tensor:
    qt = pack_matrix(spec, tuple(codes.shape), "rows", codes, scale, zero, gs)
    assert torch.equal(qt.codes(), codes)
    return qt.dequantize()


def layer_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) in float64."""
    d = (W - W_hat).double()
    return float(torch.einsum("ij,jk,ik->", d, H.double(), d))


def correlated_hessian(cols: int, tokens: int = 512, seed: int = 0) -> torch.Tensor:
    """H of inputs x = z @ A (random mixing), fed in two chunks of different dtypes."""
    x = randn(tokens, cols, seed=seed) @ randn(cols, cols, seed=seed + 1)
    stats = HessianStats(cols)
    stats.update(x[: tokens // 2])
    stats.update(x[tokens // 2:].to(torch.bfloat16))
    return stats.H


def assert_same_as_rtn(r, ref) -> None:
    codes, scale, zero, gs = ref
    assert torch.equal(r.codes, codes)
    assert torch.equal(r.scale, scale)
    assert (zero is None and r.zero is None) or torch.equal(r.zero, zero)
    assert (gs is None and r.global_scale is None) or torch.equal(r.global_scale, gs)


# --- what GPTQ relies on ------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_quantize_is_elementwise_given_qparams(name):
    """Quantizing an (n, k) block stack equals quantizing its k columns one by one."""
    fmt = FORMATS[name]
    blocks = randn(6, 40, seed=7) * torch.logspace(-2, 2, 6).reshape(-1, 1)
    blocks[:, :3] = 0.0
    blocks[0, 5] = blocks[0].abs().max()  # a block maximum, exactly at the top of the grid
    qp = fmt.choose_qparams(blocks, 1.0, fmt.global_scale(blocks))
    codes = fmt.quantize(blocks, qp)
    by_column = torch.cat([fmt.quantize(blocks[:, j:j + 1], qp) for j in range(blocks.shape[1])], dim=1)
    assert torch.equal(codes, by_column)
    deq = torch.cat([fmt.dequantize(codes[:, j:j + 1], qp) for j in range(blocks.shape[1])], dim=1)
    assert torch.equal(fmt.dequantize(codes, qp), deq)


# --- identity Hessian: GPTQ is round-to-nearest ---------------------------------------------
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_identity_hessian_equals_rtn(name, act_order):
    fmt = FORMATS[name]
    rows, cols = shape_for(fmt)
    W = randn(rows, cols, seed=1) * torch.logspace(-1, 1, rows).reshape(-1, 1)
    for g in granularities(fmt):
        spec = QuantSpec(fmt, g)
        r = gptq(W, 3.0 * torch.eye(cols), spec, act_order=act_order)
        ref = rtn(W, spec)
        assert_same_as_rtn(r, ref)
        assert torch.equal(reconstruct(spec, r.codes, r.scale, r.zero, r.global_scale), reconstruct(spec, *ref))
        assert r.dead == 0 and r.damp_used == GPTQ.damp


@pytest.mark.parametrize("search", ["mse", "lp3"])
@pytest.mark.parametrize("name", ["uint4", "int3", "nf4", "fp4_e2m1", "nvfp4", "mxfp4"])
def test_identity_hessian_equals_rtn_with_scale_search(name, search):
    fmt = get_format(name)
    spec = QuantSpec(fmt, group_for(fmt), scale_search=search)
    W = randn(4, 40, seed=2)
    assert_same_as_rtn(gptq(W, torch.eye(40), spec), rtn(W, spec))


# --- correlated inputs: GPTQ beats RTN --------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_layer_loss_at_most_rtn_on_correlated_inputs(name):
    fmt = FORMATS[name]
    spec = QuantSpec(fmt, group_for(fmt))
    rows, cols = 8, 48
    W, H = randn(rows, cols, seed=3), correlated_hessian(cols)
    r = gptq(W, H, spec)
    W_hat = reconstruct(spec, r.codes, r.scale, r.zero, r.global_scale)
    loss = layer_loss(W, W_hat, H)
    assert loss <= layer_loss(W, reconstruct(spec, *rtn(W, spec)), H)
    # the reported loss is ½·tr(ΔW H_d ΔWᵀ) with the dampened H
    H_d = H + r.damp_used * H.diagonal().mean() * torch.eye(cols)
    assert r.loss == pytest.approx(layer_loss(W, W_hat, H_d) / 2, rel=1e-3)


def reference_gptq(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, damp: float = 0.01) -> torch.Tensor:
    """Slow GPTQ from the definition: no lazy blocks, dynamic (1, g) groups chosen from the
    current weights at each group's first column. Returns codes."""
    fmt, g = spec.format, spec.granularity.size
    W = W.clone()
    Hinv, _, _ = inverse_cholesky(H, damp)
    gs = fmt.global_scale(W)
    codes = torch.empty(W.shape, dtype=torch.uint8)
    for j in range(W.shape[1]):
        if j % g == 0:
            qp = choose_qparams(W[:, j:j + g], spec, gs)  # (rows, 1) from the current weights
        codes[:, j:j + 1] = c = fmt.quantize(W[:, j:j + 1], qp)
        err = (W[:, j] - fmt.dequantize(c, qp)[:, 0]) / Hinv[j, j]
        W[:, j + 1:] -= torch.outer(err, Hinv[j, j + 1:])
    return codes


@pytest.mark.parametrize("block_size", [8, 20, 64])
@pytest.mark.parametrize("name", ["uint4", "fp4_e2m1", "nf4"])
def test_dynamic_groups_read_updated_weights(name, block_size):
    """Lazy blocks (rounded to whole groups) match the slow reference; groups see updated weights."""
    fmt = get_format(name)
    spec = QuantSpec(fmt, PerGroup(8))
    W, H = randn(6, 44, seed=4), correlated_hessian(44, seed=5)
    r = gptq(W, H, spec, block_size=block_size, damp=0.01, act_order=False)  # dynamic groups
    ref = reference_gptq(W, H, spec)
    assert (r.codes == ref).float().mean() >= 0.98  # float rounding may flip a rare near-tie
    assert not torch.equal(r.scale, rtn(W, spec)[1])  # later groups were chosen after updates


# --- act-order ----------------------------------------------------------------------------------
ACT_FORMATS = ["uint4", "int3", "uint4_fz", "nf4", "fp4_e2m1", "nvfp4", "mxfp4"]


@pytest.mark.parametrize("name", ACT_FORMATS)
def test_act_order_with_static_groups(name):
    fmt = get_format(name)
    rows, cols = 8, 40
    W, H = randn(rows, cols, seed=6), correlated_hessian(cols, seed=7)
    for g in [group_for(fmt)] + ([] if fmt.fixed_block else [PerBlock(3, 16)]):
        spec = QuantSpec(fmt, g)
        ref = rtn(W, spec)
        r = gptq(W, H, spec, act_order=True)
        assert torch.equal(r.scale, ref[1])  # static groups: RTN's qparams of the original W
        assert (ref[2] is None) or torch.equal(r.zero, ref[2])
        W_hat = reconstruct(spec, r.codes, r.scale, r.zero, r.global_scale)
        assert layer_loss(W, W_hat, H) <= layer_loss(W, reconstruct(spec, *ref), H)


@pytest.mark.parametrize("name", ACT_FORMATS)
def test_act_order_writes_codes_back_to_original_columns(name):
    """A diagonal H with distinct entries: a real permutation, but no error to spread -> RTN."""
    fmt = get_format(name)
    spec = QuantSpec(fmt, group_for(fmt))
    W = randn(5, 40, seed=8)
    H = torch.diag(torch.rand(40, generator=torch.Generator().manual_seed(9)) + 0.5)
    assert not torch.equal(torch.argsort(H.diagonal(), descending=True), torch.arange(40))
    assert_same_as_rtn(gptq(W, H, spec, act_order=True), rtn(W, spec))


def test_static_groups_without_act_order_keep_rtn_qparams():
    spec = QuantSpec(get_format("uint4"), PerGroup(16))
    W, H = randn(6, 40, seed=10), correlated_hessian(40, seed=11)
    r = gptq(W, H, spec, static_groups=True, act_order=False)
    ref = rtn(W, spec)
    assert torch.equal(r.scale, ref[1]) and torch.equal(r.zero, ref[2])
    assert not torch.equal(r.codes, ref[0])


# --- dampening, dead columns, failures ---------------------------------------------------------
def test_rank_deficient_hessian_with_a_dead_column():
    cols = 24
    x = randn(10, cols, seed=12)  # fewer tokens than columns
    x[:, 3] = 0.0
    stats = HessianStats(cols)
    stats.update(x)
    spec = QuantSpec(get_format("uint4"), PerGroup(8))
    W = randn(6, cols, seed=13)
    r = gptq(W, stats.H, spec)
    assert r.dead == 1 and r.damp_used >= 0.01 and r.loss >= 0
    W_hat = reconstruct(spec, r.codes, r.scale, r.zero, r.global_scale)
    assert torch.isfinite(W_hat).all()
    assert torch.equal(W_hat[:, 3], torch.zeros(6))  # the dead column is zeroed


def test_damp_grows_until_cholesky_succeeds():
    n = 8
    u = torch.ones(n, 1) / n**0.5
    H = torch.eye(n) - 1.5 * u @ u.T  # eigenvalue -0.5, mean diagonal 0.8125
    before = H.clone()
    U, damp, dead = inverse_cholesky(H, 0.01)
    assert damp == pytest.approx(1.0) and not dead.any()  # 0.01 and 0.1 fail, 1 works
    assert torch.equal(H, before)  # the caller's H is untouched
    H_d = H + damp * H.diagonal().mean() * torch.eye(n)
    assert torch.allclose(U.T @ U, torch.linalg.inv(H_d), rtol=1e-4, atol=1e-5)
    assert torch.equal(U, U.triu())


def test_overwrite_dampens_the_callers_matrix_and_gives_the_same_factor():
    n = 8
    u = torch.ones(n, 1) / n**0.5
    H = torch.eye(n) - 1.5 * u @ u.T  # needs damp 1 (retries rewrite the diagonal in place)
    U_copy, damp_copy, _ = inverse_cholesky(H.clone(), 0.01)
    mine = H.clone()
    U, damp, _ = inverse_cholesky(mine, 0.01, overwrite=True)
    assert damp == damp_copy and torch.equal(U, U_copy)
    assert torch.equal(mine, H + damp * H.diagonal().mean() * torch.eye(n))  # dampened in place


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_leaves_the_callers_hessian_untouched(act_order):
    H = correlated_hessian(64)
    before = H.clone()
    gptq(torch.randn(16, 64, generator=torch.Generator().manual_seed(0)), H, QuantSpec(get_format("int4"), PerGroup(32)),
         act_order=act_order)
    assert torch.equal(H, before)


def test_zero_damp_on_a_singular_hessian_retries():
    U, damp, _ = inverse_cholesky(torch.ones(4, 4), 0.0)  # rank 1
    assert damp == FIRST_RETRY_DAMP and torch.isfinite(U).all()


@pytest.mark.parametrize("H", [-torch.eye(4), torch.full((3, 3), float("nan"))], ids=["negative", "nan"])
def test_impossible_hessian_raises(H):
    with pytest.raises(LowbitError, match="Hessian"):
        inverse_cholesky(H, 0.01)
    with pytest.raises(LowbitError, match="Hessian"):
        gptq(torch.ones(2, H.shape[0]), H, QuantSpec(get_format("int4")))


# --- the accumulator and the configuration --------------------------------------------------------
def test_hessian_stats_is_two_over_n_xtx():
    x = randn(3, 50, 12, seed=14).to(torch.bfloat16)  # (batch, tokens, cols)
    stats = HessianStats(12)
    for chunk in (x[0], x[1:].to(torch.float16), x[2:, :0]):  # any float dtype, empty chunks too
        stats.update(chunk)
    ref = torch.cat([x[0].double(), x[1:].to(torch.float16).reshape(-1, 12).double()])  # (150, 12)
    assert stats.n == 150
    assert torch.allclose(stats.H.double(), 2 * ref.T @ ref / 150, rtol=1e-5, atol=1e-5)
    with pytest.raises(LowbitError, match="features"):
        stats.update(torch.ones(4, 11))


@pytest.mark.parametrize("kwargs", [dict(damp=-0.1), dict(damp=float("nan")), dict(damp=True), dict(damp=100),
                                    dict(block_size=0), dict(block_size=1.5), dict(act_order=1),
                                    dict(static_groups=1), dict(act_order=True, static_groups=False)])
def test_config_is_validated(kwargs):
    with pytest.raises(LowbitError, match="GPTQ"):
        GPTQ(**kwargs)


def test_config_static_groups_default_follows_act_order():
    assert GPTQ().static and not GPTQ(act_order=False).static
    assert GPTQ(act_order=False, static_groups=True).static
    W, H = randn(4, 32, seed=15), correlated_hessian(32, seed=16)
    spec = QuantSpec(get_format("uint4"), PerGroup(16))
    a, b = GPTQ().solve(W, H, spec), gptq(W, H, spec, damp=GPTQ().damp, act_order=True)
    assert torch.equal(a.codes, b.codes) and a.loss == b.loss
    c, d = GPTQ(act_order=False).solve(W, H, spec), gptq(W, H, spec, damp=GPTQ().damp, act_order=False)
    assert torch.equal(c.codes, d.codes) and c.loss == d.loss


def test_defaults_are_the_measured_ones_and_the_cli_uses_them():
    """The gptq method (CLI and recipes) takes its defaults from the GPTQ dataclass, which BENCHMARKS.md measured."""
    from lowbit.modifiers import make
    from lowbit.recipe.recipe import from_methods

    assert GPTQ().act_order and GPTQ().damp == DEFAULT_DAMP
    assert make("gptq").config == GPTQ()
    assert from_methods("gptq", {}).stages[0].modifier.config == GPTQ()
    assert from_methods("gptq", {"damp": 0.1}).stages[0].modifier.config == GPTQ(damp=0.1)
    assert (DEFAULT_DAMP, GPTQ().block_size) == (1.0, 128)


def test_the_function_has_the_dataclass_defaults():
    """One set of defaults: every keyword of ``gptq`` named like a ``GPTQ`` field defaults to it,
    and a bare call gives what ``GPTQ().solve`` gives, not the paper's damp 0.01 without act-order."""
    import dataclasses
    import inspect

    params = inspect.signature(gptq).parameters
    for f in dataclasses.fields(GPTQ):
        assert params[f.name].default == f.default, f.name
    W, H = randn(6, 48, seed=17), correlated_hessian(48, seed=18)
    spec = QuantSpec(get_format("uint4"), PerGroup(16))
    bare, cfg = gptq(W, H, spec), GPTQ().solve(W, H, spec)
    assert torch.equal(bare.codes, cfg.codes) and bare.loss == cfg.loss and bare.damp_used == GPTQ().damp
    paper = gptq(W, H, spec, damp=0.01, act_order=False)
    assert not torch.equal(bare.codes, paper.codes)  # the defaults decide something here


def test_shapes_are_checked():
    with pytest.raises(LowbitError, match="H"):
        gptq(torch.ones(2, 4), torch.eye(5), QuantSpec(get_format("int4")))
