"""Sparse models through save and load: the in-memory pruned model, ``lowbit.load`` (packed and
``packed=False``) and transformers' ``from_pretrained`` give bit-identical logits, for float pruned
and quantized + masked models, unstructured and 2:4; bits per weight count the mask's bit."""
from __future__ import annotations

import copy
import json
import sys
from math import prod
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.hf.quantizer import loading
from lowbit.nn import QuantLinear
from lowbit.nn.convert import pack_model
from lowbit.nn.reference import masks, quantized_tensors
from lowbit.report import bits_per_weight, manifest_bits_per_weight

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import families  # noqa: E402
from families import V  # noqa: E402

# (scheme, method): float pruned and quantized + masked, unstructured and 2:4. int8:channel and
# int4:g32 run on the int8/int4 kernels (the mask is free: pruned codes are the exact zero code);
# uint4:g32 has an integer zero point; nf4 takes the dequant kernel, which applies the mask.
CASES = [("s=50%", "wanda"), ("s=2:4", "wanda"), ("int8:channel+s=50%", "wanda+rtn"),
         ("int4:g32+s=2:4", "wanda+rtn"), ("uint4:g32+s=50%", "wanda+rtn"), ("nf4:g32+s=2:4", "wanda+rtn")]


def windows(n: int = 8, t: int = 16) -> torch.Tensor:
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """(scheme, method) -> (model in memory, saved folder), built once."""
    cache: dict = {}

    def make(scheme: str, method: str):
        if (scheme, method) not in cache:
            torch.manual_seed(0)
            model = lowbit.quantize(families.llama().eval(), scheme, method=method, calib=windows(), progress=False)
            out = tmp_path_factory.mktemp("sparse") / "q"
            lowbit.save(model, out)
            cache[scheme, method] = model, out
        return cache[scheme, method]

    return make


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("scheme, method", CASES)
def test_every_loader_gives_the_in_memory_logits(pruned, scheme, method):
    from transformers import AutoModelForCausalLM

    model, out = pruned(scheme, method)
    x = families.example_input("llama")
    ref = logits(model, x)
    assert torch.equal(logits(lowbit.load(out, packed=False), x), ref)
    packed_in_memory = logits(pack_model(copy.deepcopy(model)), x)  # the same kernels lowbit.load picks
    assert torch.equal(logits(lowbit.load(out), x), packed_in_memory)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), x), packed_in_memory)
    with loading(packed=False):
        assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), x), ref)
    if "+" not in scheme:  # float pruned: nothing to pack, every path is the reference
        assert torch.equal(packed_in_memory, ref)


@pytest.mark.parametrize("scheme, method", CASES)
def test_loaded_weights_hold_zeros_exactly_where_the_mask_says(pruned, scheme, method):
    model, out = pruned(scheme, method)
    want = {f"{n}.{p}": m for n, p, m in masks(model)}
    want.update({f"{n}.{p}": qt.mask for n, p, qt, _ in quantized_tensors(model)})
    assert len(want) == 14 and all(m is not None for m in want.values())
    for packed in (True, False):
        loaded = lowbit.load(out, packed=packed)
        got = {f"{n}.{p}": (getattr(loaded.get_submodule(n), p), m) for n, p, m in masks(loaded)}
        got.update({f"{n}.{p}": (qt.dequantize(), qt.mask) for n, p, qt, _ in quantized_tensors(loaded)})
        assert got.keys() == want.keys()
        for key, (w, keep) in got.items():
            assert torch.equal(keep, want[key]), key
            assert bool((w[~keep] == 0).all()), key  # zeros where pruned
            if "+" not in scheme:  # float: the random weights have no zeros of their own
                assert torch.equal(w == 0, ~keep), key
            if packed and "+" in scheme:
                assert isinstance(loaded.get_submodule(key.rpartition(".")[0]), QuantLinear), key


def test_int_kernels_run_masked_weights_without_a_mask_path(pruned):
    """Symmetric int codes of pruned weights are the zero code: the int kernels need no mask."""
    from lowbit.nn.convert import kernel_counts

    assert kernel_counts(lowbit.load(pruned("int8:channel+s=50%", "wanda+rtn")[1])) == {"int8": 14}
    assert kernel_counts(lowbit.load(pruned("int4:g32+s=2:4", "wanda+rtn")[1])) == {"int4": 14}
    assert kernel_counts(lowbit.load(pruned("nf4:g32+s=2:4", "wanda+rtn")[1])) == {"dequant": 14}


@pytest.mark.parametrize("scheme, method", CASES[2:])
def test_bits_per_weight_count_one_mask_bit_per_weight(pruned, scheme, method):
    """From the definition: each stored role's bits, padding excluded, plus exactly 1 bit per weight."""
    model, out = pruned(scheme, method)
    bits = numel = 0
    for _, _, qt, _ in quantized_tensors(model):
        fmt = qt.spec.format
        core = {r: t for r, t in qt.to_tensors().items() if r != "mask"}
        stored = sum(t.numel() * t.element_size() * 8 for t in core.values())
        pad = -(qt.numel * fmt.bits) % 8 + (-(qt.zero.numel() * fmt.bits) % 8 if "zero" in core and
                                            fmt.zero_kind == "int" else 0)
        assert qt.nbits() == stored - pad + qt.numel  # the mask: one bit per weight
        bits, numel = bits + qt.nbits(), numel + qt.numel
    assert bits_per_weight(model) == pytest.approx(bits / numel, abs=0, rel=1e-12)
    unmasked = [(qt, qt.nbits()) for _, _, qt, _ in quantized_tensors(model)]
    assert bits_per_weight(model) - sum(b - qt.numel for qt, b in unmasked) / numel == pytest.approx(1.0)
    manifest = json.loads((out / "lowbit.json").read_text())["quantized"]
    padded = sum(-(prod(m["shape"])) % 8 for m in manifest.values())  # a file stores whole bytes of mask
    assert manifest_bits_per_weight(out) * numel == bits + padded + sum(
        -(qt.numel * qt.spec.format.bits) % 8 + (-(qt.zero.numel() * qt.spec.format.bits) % 8
                                                 if qt.zero is not None and qt.spec.format.zero_kind == "int" else 0)
        for qt, _ in unmasked)
