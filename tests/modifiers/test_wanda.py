"""Wanda pruning: the per-row selection against a slow loop, exact N:M patterns, and the method
through the engine (tiny Llama): masks recorded, prune-then-quantize, save/load, resume, CLI."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.algorithms.wanda import ColumnSquares, keep_mask, saliency, wanda
from lowbit.errors import LowbitError
from lowbit.modifiers import make
from lowbit.nn.reference import float_masks, masks, qtensors, quantized_tensors
from lowbit.scheme import SparsitySpec, TensorScheme
from lowbit.schemes import parse_tensor_scheme

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import families  # noqa: E402
from families import V  # noqa: E402

HALF = SparsitySpec("unstructured", 0.5)
TWO_FOUR = SparsitySpec("nm", n=2, m=4)


def slow_keep(score: torch.Tensor, sparsity: SparsitySpec) -> torch.Tensor:
    """From the definition, one row (and one run of M) at a time: drop the lowest scores, the
    lower column first among equal scores."""
    rows, cols = score.shape
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for i in range(rows):
        row = score[i].tolist()
        if sparsity.kind == "unstructured":
            runs, drop = [list(range(cols))], round(cols * sparsity.ratio)
        else:
            m = sparsity.m
            runs, drop = [list(range(s, s + m)) for s in range(0, cols, m)], m - sparsity.n
        for run in runs:
            for j in sorted(run, key=lambda j: (row[j], j))[:drop]:
                keep[i, j] = False
    return keep


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return families.llama().eval()


def windows(n: int = 8, t: int = 16) -> torch.Tensor:
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("sparsity", [HALF, SparsitySpec("unstructured", 0.3), SparsitySpec("unstructured", 0.29),
                                      TWO_FOUR, SparsitySpec("nm", n=4, m=8), SparsitySpec("nm", n=1, m=4)])
def test_selection_matches_a_slow_loop_ties_included(sparsity):
    g = torch.Generator().manual_seed(1)
    score = torch.randint(0, 6, (12, 40), generator=g).float()  # few values: many ties
    assert torch.equal(keep_mask(score, sparsity), slow_keep(score, sparsity))
    score = torch.rand(9, 64, generator=g)
    assert torch.equal(keep_mask(score, sparsity), slow_keep(score, sparsity))


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_keeps_exactly_n_in_every_run_of_m(n, m):
    score = torch.randn(32, 128, generator=torch.Generator().manual_seed(2)).abs()
    keep = keep_mask(score, SparsitySpec("nm", n=n, m=m))
    assert (keep.reshape(32, 128 // m, m).sum(-1) == n).all()


def test_half_is_exactly_half_of_every_row():
    W, norms = torch.randn(48, 96), torch.rand(96) + 0.1
    pruned, keep = wanda(W, norms, HALF)
    assert (keep.sum(1) == 48).all() and ((pruned == 0).sum(1) == 48).all()
    assert torch.equal(pruned[keep], W[keep])
    assert not torch.signbit(pruned[~keep]).any()  # +0.0, never -0.0


def test_input_norms_decide_against_magnitude():
    """A small weight on a loud input outranks a large weight on a quiet one (the paper's point)."""
    W = torch.tensor([[0.1, 1.0, 0.5, 0.6]])
    norms = torch.tensor([100.0, 0.01, 1.0, 1.0])
    _, keep = wanda(W, norms, HALF)
    assert keep.tolist() == [[True, False, False, True]]
    torch.testing.assert_close(saliency(W, norms), torch.tensor([[10.0, 0.01, 0.5, 0.6]]))


def test_column_squares_are_the_norms_over_every_token():
    g = torch.Generator().manual_seed(3)
    parts = [torch.randn(2, 5, 24, generator=g, dtype=torch.float64) for _ in range(3)]
    stats = ColumnSquares(24)
    for x in parts:
        stats.update(x.to(torch.bfloat16).float())  # any float dtype; (..., cols) flattened
    X = torch.cat([x.to(torch.bfloat16).double().reshape(-1, 24) for x in parts])  # (30, 24)
    assert stats.n == 30 and stats.sq.dtype == torch.float64
    torch.testing.assert_close(stats.norms(), X.norm(dim=0).float())
    with pytest.raises(LowbitError, match="23 features but the statistics have 24 columns"):
        stats.update(torch.zeros(4, 23))


def test_channel_sparsity_and_bad_widths_are_refused():
    stats = ColumnSquares(6)
    stats.update(torch.ones(3, 6))
    m = make("wanda")
    with pytest.raises(LowbitError, match="channel sparsity removes whole input channels.*s=2:4"):
        m.solve_layer(torch.ones(4, 6), stats, TensorScheme(sparsity=SparsitySpec("channel", 0.3)), "x")
    with pytest.raises(LowbitError, match="2:4 needs the input width to be a multiple of 4, but this layer has 6"):
        m.solve_layer(torch.ones(4, 6), stats, TensorScheme(sparsity=TWO_FOUR), "x")
    with pytest.raises(LowbitError, match="x: wanda needs the layer's calibration inputs"):
        m.solve_layer(torch.ones(4, 6), ColumnSquares(6), TensorScheme(sparsity=HALF), "x")
    with pytest.raises(LowbitError, match=r"stage 1 \(wanda\): channel sparsity"):  # at planning, before data
        lowbit.quantize(tiny_llama(), "s=channel:0.3", method="wanda", calib=windows(), progress=False)


def first_block_inputs(model: torch.nn.Module, calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every Linear of block 0 -> its inputs (tokens, in) on the untouched model, by hooks."""
    seen: dict[str, list] = {}

    def keep(name):
        return lambda mod, args: seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))

    hooks = [mod.register_forward_pre_hook(keep(n))
             for n, mod in model.model.layers[0].named_modules() if isinstance(mod, torch.nn.Linear)]
    with torch.no_grad():
        for batch in calib.split(8):
            model(batch)
    for h in hooks:
        h.remove()
    return {n: torch.cat(xs) for n, xs in seen.items()}


@pytest.mark.parametrize("scheme", ["s=50%", "s=2:4"])
def test_run_on_tiny_llama_records_the_masks_of_the_definition(scheme):
    calib = windows()
    model = tiny_llama()
    inputs = first_block_inputs(tiny_llama(), calib)
    sparsity = parse_tensor_scheme(scheme).sparsity
    lowbit.quantize(model, scheme, method="wanda", calib=calib, progress=False)
    recorded = {f"{n}.{p}": m for n, p, m in masks(model)}
    assert len(recorded) == 14  # 7 linears × 2 blocks, all float
    assert not list(quantized_tensors(model))
    for key, keep in recorded.items():
        w = model.get_submodule(key.rpartition(".")[0]).weight
        assert torch.equal(w == 0, ~keep), key  # zero exactly where pruned (the random weights have no zeros)
        assert torch.equal(keep.sum(1), torch.full((w.shape[0],), w.shape[1] // 2)), key
    original = tiny_llama()
    for name, X in inputs.items():  # block 0 saw the float model's inputs: the definition, by a slow loop
        W = original.model.layers[0].get_submodule(name).weight.detach()
        score = W.abs() * X.double().pow(2).sum(0).sqrt().float()
        assert torch.equal(recorded[f"model.layers.0.{name}.weight"], slow_keep(score, sparsity)), name


def test_prune_then_quantize_carries_the_mask_into_the_quantized_tensor(tmp_path):
    calib = windows()
    pruned = lowbit.quantize(tiny_llama(), "s=50%", method="wanda", calib=calib, progress=False)
    model = lowbit.quantize(tiny_llama(), "int8:channel+s=50%", method="wanda+rtn", calib=calib, progress=False)
    assert not list(masks(model))  # every float mask moved into its QuantizedTensor
    found = list(quantized_tensors(model))
    assert len(found) == 14
    for name, param, qt, _ in found:
        assert qt.mask is not None, name
        w = qt.dequantize(torch.float32)
        assert torch.equal(w[~qt.mask], torch.zeros(int((~qt.mask).sum()))), name
        assert int((~qt.mask).sum()) == qt.mask.numel() // 2
        if name.startswith("model.layers.0."):  # block 0 sees the same inputs in both runs
            assert torch.equal(qt.mask, float_masks(pruned.get_submodule(name))[param]), name
    lowbit.save(model, tmp_path / "q")
    loaded = lowbit.load(tmp_path / "q", packed=False)
    again = {f"{n}.{p}": qt for n, p, qt, _ in quantized_tensors(loaded)}
    for name, param, qt, _ in found:
        assert torch.equal(again[f"{name}.{param}"].mask, qt.mask), name
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_save_and_load_keep_float_masks(tmp_path):
    model = lowbit.quantize(tiny_llama(), "s=2:4", method="wanda", calib=windows(), progress=False)
    lowbit.save(model, tmp_path / "p")
    manifest = json.loads((tmp_path / "p" / "lowbit.json").read_text())
    assert len(manifest["masks"]) == 14 and not manifest["quantized"]
    loaded = lowbit.load(tmp_path / "p")
    before = {(n, p): m for n, p, m in masks(model)}
    after = {(n, p): m for n, p, m in masks(loaded)}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_interrupted_run_resumes_to_the_same_weights_and_masks(tmp_path, monkeypatch):
    """Stopped after block 0's checkpoint, then resumed: block 0's pruned floats and masks come
    back from the checkpoint (``engine.restore``) and the result equals an uninterrupted run."""
    from lowbit.engine import checkpoint
    from lowbit.engine.runner import calibrate
    from lowbit.models.targets import default_plan

    scheme = parse_tensor_scheme("s=50%")
    batches = list(windows().split(4))
    ref = tiny_llama()
    calibrate(ref, default_plan(ref, scheme), "wanda", batches, progress=False)

    done = checkpoint.RunDir.mark_done

    def stop_after_first(self, block):
        done(self, block)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.RunDir, "mark_done", stop_after_first)
    model = tiny_llama()
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, default_plan(model, scheme), "wanda", batches, workdir=tmp_path / "run", fingerprint="f",
                  progress=False)
    monkeypatch.setattr(checkpoint.RunDir, "mark_done", done)
    model = tiny_llama()  # a new process would start from the original weights
    report = calibrate(model, default_plan(model, scheme), "wanda", batches, workdir=tmp_path / "run",
                       fingerprint="f", resume=True, progress=False)
    assert report.resumed_from == 1
    assert ref.state_dict().keys() == model.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    want, got = {(n, p): m for n, p, m in masks(ref)}, {(n, p): m for n, p, m in masks(model)}
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


RUN = ("--samples", "4", "--seq-len", "32", "--batch-size", "2")


def test_cli_method_and_recipe_give_the_same_folder(run, tiny_llama_dir, tmp_path):
    by_method = tmp_path / "m"
    r = run("quantize", str(tiny_llama_dir), "--scheme", "s=50%", "--method", "wanda", "--out", str(by_method), *RUN)
    assert r.returncode == 0, r.stderr
    assert "fallback" not in r.stdout
    assert re.search(r"│ float +│", r.stdout) and "0.000" not in r.stdout  # pruned, not quantized
    recipe = tmp_path / "wanda.yaml"
    recipe.write_text("stages:\n  - method: wanda\n    scheme: s=50%\n")
    by_recipe = tmp_path / "r"
    r = run("quantize", str(tiny_llama_dir), "--scheme", "s=50%", "--recipe", str(recipe), "--out", str(by_recipe),
            *RUN)
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in by_method.iterdir())
    assert files == sorted(p.name for p in by_recipe.iterdir())
    for name in files:
        if name.endswith(".safetensors"):
            assert (by_method / name).read_bytes() == (by_recipe / name).read_bytes(), name
    model = lowbit.load(by_method)
    found = list(masks(model))
    assert len(found) == 14
    for n, p, keep in found:
        w = getattr(model.get_submodule(n), p)
        assert int((w == 0).sum()) >= w.numel() // 2 and torch.equal(w[~keep], torch.zeros(int((~keep).sum())))


def test_cli_refuses_wanda_without_a_sparsity(run, tiny_llama_dir, tmp_path):
    r = run("quantize", str(tiny_llama_dir), "--scheme", "int8", "--method", "wanda", "--out", str(tmp_path / "q"),
            *RUN)
    assert r.returncode == 2 and "method wanda needs a sparsity spec (+s=...)" in r.stderr


def test_cli_streamed_run_resumed_gives_identical_bytes(run, tiny_llama_dir, tmp_path, monkeypatch):
    """The CLI streams the tiny folder's weights: a resumed run rebuilds block 0's pruned weights
    and masks from the checkpoint when it saves."""
    from lowbit.engine import checkpoint

    args = ("--scheme", "s=2:4", "--method", "wanda", *RUN)
    assert run("quantize", str(tiny_llama_dir), "--out", str(tmp_path / "ref"), *args).returncode == 0
    done = checkpoint.RunDir.mark_done

    def stop_after_first(self, block):
        done(self, block)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.RunDir, "mark_done", stop_after_first)
    stopped = run("quantize", str(tiny_llama_dir), "--out", str(tmp_path / "out"), *args)
    assert stopped.returncode == 130  # an interrupted command (128 + SIGINT)
    assert json.loads((tmp_path / "out.partial" / "state.json").read_text())["done"] == 1
    monkeypatch.setattr(checkpoint.RunDir, "mark_done", done)
    r = run("quantize", str(tiny_llama_dir), "--out", str(tmp_path / "out"), *args, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed at block" in r.stdout
    ref, out = tmp_path / "ref", tmp_path / "out"
    names = sorted(p.name for p in ref.iterdir() if p.suffix == ".safetensors")
    assert names and names == sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors")
    for name in names:
        assert (ref / name).read_bytes() == (out / name).read_bytes(), name


def test_fused_experts_are_pruned_expert_by_expert_and_idle_experts_left_dense():
    from lowbit.algorithms.wanda import ColumnSquares
    from lowbit.engine.report import RunReport
    from lowbit.engine.solve import solve_target
    from lowbit.models.targets import targets

    torch.manual_seed(0)
    model = families.mixtral().eval()
    target = next(t for t in targets(model) if t.kind == "experts" and t.key.endswith("down_proj"))
    module = model.get_submodule(target.module_name)
    before = getattr(module, target.param).detach().clone()  # (E, out, in)
    g = torch.Generator().manual_seed(1)
    stats, inputs = {}, {}
    for e in (0, 2):  # experts 1 and 3 saw no token
        inputs[e] = torch.randn(7, before.shape[2], generator=g)
        stats[e] = ColumnSquares(before.shape[2])
        stats[e].update(inputs[e])
    report = RunReport()
    solve_target(make("wanda"), target, module, TensorScheme(sparsity=TWO_FOUR), stats, report)
    after, keep = getattr(module, target.param).detach(), float_masks(module)[target.param]
    for e in (0, 2):
        expected = slow_keep(before[e].abs() * inputs[e].double().pow(2).sum(0).sqrt().float(), TWO_FOUR)
        assert torch.equal(keep[e], expected), e
        assert torch.equal(after[e], before[e] * expected), e
    for e in (1, 3):
        assert torch.equal(after[e], before[e]) and bool(keep[e].all()), e
    assert report.fallbacks == [f"{target.key}: experts [1, 3] saw no calibration token, left as they are"]
    assert sorted(r["key"] for r in report.layers) == [f"{target.key}[0]", f"{target.key}[2]"]


def test_fused_experts_pruned_then_quantized_keep_their_masks(tmp_path):
    torch.manual_seed(0)
    model = families.mixtral().eval()
    lowbit.quantize(model, "uint4:g16+s=50%", method="wanda+rtn", calib=windows(), progress=False)
    experts = [(n, p, qt) for n, p, qt, _ in quantized_tensors(model) if ".experts" in n]
    assert len(experts) == 4
    for name, param, qt in experts:
        assert qt.mask is not None and qt.mask.dim() == 3, name
        w = qt.dequantize(torch.float32)  # (E, out, in)
        assert torch.equal(w[~qt.mask], torch.zeros(int((~qt.mask).sum()))), name
        assert int((~qt.mask).sum()) == qt.mask.numel() // 2, name  # half of every row, in every expert
    lowbit.save(model, tmp_path / "q")
    again = {(n, p): qt for n, p, qt, _ in quantized_tensors(lowbit.load(tmp_path / "q", packed=False))}
    assert all(torch.equal(again[(n, p)].mask, qt.mask) for n, p, qt in experts)
