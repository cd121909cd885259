"""Sparse models through every export: densified with a warning by default (no target has a
sparse format its current readers load), pruned weights read back as exact zeros by each target's
own reader, refused where the target's encoding has no exact zero.

compressed-tensors 0.20 has no sparse compressor (``sparse-bitmask`` / ``sparse-24-bitmask``
were removed in 0.15): the tests assert that, so a release that brings them back fails here.
The opt-in sparse formats (``sparse_format=``) are read back by compressed-tensors 0.14.0.1's own
compressors, installed apart by scripts/install.sh and run in a subprocess.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import gguf  # noqa: E402 - a missing reader fails: scripts/install.sh installs the [export,test] extras
import onnx  # noqa: E402
import compressed_tensors  # noqa: E402,F401

import lowbit
from lowbit.errors import LowbitError
from lowbit.export import export
from lowbit.export._sparse import fold_mask, zero_codes
from lowbit.nn.reference import attach_mask, masks, quantized_tensors
from lowbit.quantizer import quantize_weight
from lowbit.schemes import parse_scheme

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
sys.path.insert(0, str(Path(__file__).parent))
import families  # noqa: E402
from test_compressed_tensors import decompress, safetensors_of  # noqa: E402
from test_onnx import dequantized, run  # noqa: E402

ATOL = 1e-5  # onnxruntime vs ATen: the order of float32 sums only


def keep_mask(w: torch.Tensor, kind: str) -> torch.Tensor:
    """Magnitude keep-mask of a (rows, cols) weight: half of every row, or 2 of every 4 inputs."""
    rows, cols = w.shape
    if kind == "2:4":
        runs = w.abs().reshape(rows, cols // 4, 4)
        keep = torch.zeros_like(runs, dtype=torch.bool).scatter_(-1, runs.topk(2, dim=-1).indices, True)
        return keep.reshape(rows, cols)
    return torch.zeros_like(w, dtype=torch.bool).scatter_(1, w.abs().topk(cols // 2, dim=1).indices, True)


def prune(model: torch.nn.Module, kind: str, under: str = "") -> torch.nn.Module:
    """Prune every Linear under ``under`` in place and record its mask (``attach_mask``)."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith(under) and "lm_head" not in name:
            keep = keep_mask(mod.weight.detach(), kind)
            with torch.no_grad():
                mod.weight.copy_(torch.where(keep, mod.weight, 0.0))  # +0.0, as wanda writes
            attach_mask(mod, "weight", keep)
    return model


def pruned_weights(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """key -> (lowbit's weight, keep-mask) for every pruned weight, float or quantized."""
    out = {f"{n}.{p}": (getattr(model.get_submodule(n), p).detach(), m) for n, p, m in masks(model)}
    out.update({f"{n}.{p}": (qt.dequantize(), qt.mask) for n, p, qt, _ in quantized_tensors(model)
                if qt.mask is not None})
    return out


# --- folding a mask into codes -------------------------------------------------------------------
FOLDABLE = ["int4:g32", "int8:channel", "uint4:g32", "uint8:tensor", "int3:b4x16", "fp8_e4m3fn:channel",
            "nf4:g32", "mxfp4", "nvfp4"]


@pytest.mark.parametrize("scheme", FOLDABLE)
def test_fold_mask_keeps_the_masked_reconstruction_exactly(scheme):
    """An unpruned weight quantized, then masked: folding replaces exactly the pruned codes."""
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(48, 64, generator=torch.Generator().manual_seed(1)) > 0.5
    qt = replace(quantize_weight(w, parse_scheme(scheme)), mask=mask)
    folded = fold_mask(qt, "w", "gguf")
    assert folded.mask is None and torch.equal(folded.scale, qt.scale)
    got, want = folded.dequantize(), qt.dequantize()
    assert torch.equal(got, want) and not torch.signbit(got[~mask]).any()
    assert torch.equal(folded.codes()[mask], qt.codes()[mask])  # kept codes untouched


@pytest.mark.parametrize("bits", [4, 8])
def test_zero_codes_against_the_definition(bits):
    """Symmetric int: the middle code 2^(b-1); integer zero point z: code z (slow loop over blocks)."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    sym = quantize_weight(w, parse_scheme(f"int{bits}:g16"))
    codes, exact = zero_codes(sym)
    assert exact.all() and (codes == 2 ** (bits - 1)).all()
    asym = quantize_weight(w, parse_scheme(f"uint{bits}:g16"))
    codes, exact = zero_codes(asym)
    assert exact.all()
    for r in range(8):
        for c in range(64):
            assert codes[r, c] == int(asym.zero[r, c // 16])


def test_a_float_zero_point_has_no_exact_zero_and_is_refused():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    mask = torch.rand(16, 64, generator=torch.Generator().manual_seed(4)) > 0.5
    qt = replace(quantize_weight(w * mask, parse_scheme("uint4_fz:g32")), mask=mask)
    _, exact = zero_codes(qt)
    assert not exact.any()  # the min-max offset m of a random block is never -s·c
    n = int((~mask).sum())
    with pytest.raises(LowbitError, match=r"^gguf cannot store the pruned weights of w: GGUF has no sparse tensor "
                                          rf"type, .*uint4_fz:g32 has no code that is exactly 0 for {n} of them"):
        fold_mask(qt, "w", "gguf")


def test_compressed_tensors_has_no_sparse_compressor_in_this_version():
    """Why the compressed-tensors export densifies: a release with them back fails this test."""
    from compressed_tensors.compressors import BaseCompressor

    for fmt in ("sparse-bitmask", "sparse-24-bitmask"):
        with pytest.raises(KeyError):
            BaseCompressor.get_value_from_registry(fmt)


# --- whole models through each export --------------------------------------------------------
# (pruning, scheme): float pruned, and quantized + masked in formats each target holds.
GGUF_CASES = [("50%", None), ("2:4", None), ("2:4", "int4:g32"), ("50%", "int8:g32"), ("2:4-after", "int4:g32")]
CT_CASES = [("50%", None), ("2:4", None), ("2:4", "int4:g32"), ("50%", "uint4:g32"), ("2:4", "fp8_e4m3fn:channel"),
            ("2:4-after", "uint4:g32"), ("50%-after", "int8:channel")]


def tiny_llama(vocab: int = families.V):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def mask_after(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """Give every quantized block weight a keep-mask after quantization: its pruned codes are the
    unpruned weights' codes, not zero codes, so an export must fold them."""
    from lowbit.nn.reference import attach

    for name, param, qt, dtype in list(quantized_tensors(model)):
        if name.startswith("model.layers."):
            attach(model.get_submodule(name), param, replace(qt, mask=keep_mask(qt.dequantize(), kind)), dtype)
    return model


def sparse_folder(out: Path, kind: str, scheme: str | None, tokenizer=None, vocab: int = families.V):
    """A pruned tiny Llama (every block Linear), quantized with ``scheme`` when given, saved.

    ``kind`` "2:4-after" quantizes first and masks the quantized weights (``mask_after``).
    """
    if kind.endswith("-after"):
        model = mask_after(lowbit.quantize(tiny_llama(vocab), scheme, progress=False), kind.removesuffix("-after"))
    else:
        model = prune(tiny_llama(vocab), kind, under="model.layers.")
    if scheme is not None and not kind.endswith("-after"):
        lowbit.quantize(model, scheme, progress=False)  # the float masks move into each QuantizedTensor
    assert len(pruned_weights(model)) == 14
    return model, lowbit.save(model, out, tokenizer=tokenizer)


def test_quantizing_a_pruned_model_carries_every_mask():
    model = prune(tiny_llama(), "2:4", under="model.layers.")
    before = {f"{n}.{p}": m for n, p, m in masks(model)}
    lowbit.quantize(model, "int4:g32", progress=False)
    after = {f"{n}.{p}": qt.mask for n, p, qt, _ in quantized_tensors(model) if qt.mask is not None}
    assert not list(masks(model)) and after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("kind, scheme", GGUF_CASES)
def test_gguf_densifies_with_zeros_where_the_mask_says(kind, scheme, tokenizer, tmp_path, caplog):
    from lowbit.export.gguf import llama_rows

    model, folder = sparse_folder(tmp_path / "q", kind, scheme, tokenizer, len(tokenizer))
    with caplog.at_level(logging.WARNING):
        file = export(folder, "gguf", tmp_path / "m.gguf")
    assert "gguf: GGUF has no sparse tensor type; 14 pruned weights" in caplog.text
    got = {t.name: t for t in gguf.GGUFReader(file).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for key, (w, keep) in pruned_weights(model).items():
        t = got[names.get_name(key, try_suffixes=(".weight",))]
        y = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)  # llama.cpp's own numbers
        if key.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's rotary row order
            heads = 4 if "q_proj" in key else 2
            w, keep = w[llama_rows(w.shape[0], heads)], keep[llama_rows(w.shape[0], heads)]
        assert t.tensor_type.name == ("F32" if scheme is None else {"int4:g32": "Q4_0", "int8:g32": "Q8_0"}[scheme])
        assert np.array_equal(y, w.numpy()), key
        assert (y[~keep.numpy()] == 0).all() and not np.signbit(y[~keep.numpy()]).any(), key


def test_gguf_refuses_a_mask_its_type_cannot_hold_as_zeros(tokenizer, tmp_path):
    model, folder = sparse_folder(tmp_path / "q", "50%", "uint4_fz:g32", tokenizer, len(tokenizer))
    with pytest.raises(LowbitError, match=r"^gguf cannot store the pruned weights of model\.layers\.0\.mlp\.down_proj"
                                          r"\.weight: GGUF has no sparse tensor type, .*uint4_fz:g32 has no code"):
        export(folder, "gguf", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("kind, scheme", CT_CASES)
def test_compressed_tensors_densifies_and_decompresses_to_lowbit(kind, scheme, tmp_path, caplog):
    """Checked with compressed-tensors' own model-free dequantizer where there are quantized weights;
    a float pruned model is a plain dense folder (read with safetensors, loaded by transformers)."""
    from transformers import AutoModelForCausalLM

    model, folder = sparse_folder(tmp_path / "q", kind, scheme)
    with caplog.at_level(logging.WARNING):
        out = export(folder, "compressed-tensors", tmp_path / "ct")
    assert "compressed-tensors: compressed-tensors 0.15+ has no sparse compressor" in caplog.text
    config = json.loads((out / "config.json").read_text())
    got = decompress(out) if scheme is not None else safetensors_of(out)
    assert not [k for k in got if k.endswith(("_mask", ".mask"))]
    for key, (w, keep) in pruned_weights(model).items():
        assert torch.equal(got[key], w), key  # bit for bit: float32 scales, (q - zp) * scale in float32
        assert (got[key][~keep] == 0).all() and not torch.signbit(got[key][~keep]).any(), key
    if scheme is None:
        assert "quantization_config" not in config
    else:  # vLLM raises for a sparsity_config naming targets, even of format dense: none is written
        assert config["quantization_config"]["sparsity_config"] == {}
    if scheme is None or not scheme.startswith("uint"):  # transformers refuses packed zero points (see
        x = families.example_input("llama")                # test_compressed_tensors): vLLM and the dequantizer read them
        reread = AutoModelForCausalLM.from_pretrained(out).eval()
        assert torch.equal(families.output(reread, x), families.output(model, x))


# --- compressed-tensors' sparse formats, read by the last release that has them -----------------
CT_SPARSE = Path(__file__).parents[2] / ".cache" / "ct-sparse"  # compressed-tensors 0.14.0.1 (scripts/install.sh)
READ_SPARSE = """
import json, sys
from compressed_tensors.compressors import ModelCompressor
from safetensors.torch import save_file
folder, out = sys.argv[1], sys.argv[2]
config = json.load(open(folder + "/config.json"))["quantization_config"]
mc = ModelCompressor.from_compression_config(config)
assert mc.quantization_config is None, mc.quantization_config
print(type(mc.sparsity_compressor).__name__, mc.sparsity_config.sparsity_structure)
save_file({k: v.contiguous() for k, v in mc.sparsity_compressor.decompress(folder)}, out)
"""


@pytest.mark.parametrize("kind, sparse_format, reader", [("50%", "sparse-bitmask", "BitmaskCompressor unstructured"),
                                                         ("2:4", "sparse-24-bitmask", "Sparse24BitMaskCompressor 2:4"),
                                                         ("2:4", "sparse-bitmask", "BitmaskCompressor unstructured")])
def test_compressed_tensors_sparse_formats_decompress_with_their_own_reader(kind, sparse_format, reader, tmp_path):
    import subprocess

    from safetensors.torch import load_file

    assert (CT_SPARSE / "compressed_tensors").is_dir(), "run scripts/install.sh: it installs compressed-tensors 0.14"
    model, folder = sparse_folder(tmp_path / "p", kind, None)
    with torch.no_grad():  # a kept weight that is exactly 0 must stay kept: the mask, not the zeros, decides
        model.model.layers[0].mlp.up_proj.weight[0, pruned_weights(model)["model.layers.0.mlp.up_proj.weight"][1][0]
                                                 .nonzero()[0]] = 0.0
    folder = lowbit.save(model, tmp_path / "p2")
    out = export(folder, "compressed-tensors", tmp_path / "ct", sparse_format=sparse_format)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["sparsity_config"]["format"] == sparse_format and abs(config["sparsity_config"]["global_sparsity"]
                                                                       - 0.5) < 1e-9
    r = subprocess.run([sys.executable, "-c", READ_SPARSE, str(out), str(tmp_path / "dense.safetensors")],
                       capture_output=True, text=True, env={"PYTHONPATH": str(CT_SPARSE), "PATH": "/usr/bin:/bin",
                                                           "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[:2] == reader.split()
    got = load_file(str(tmp_path / "dense.safetensors"))
    state = model.state_dict()
    for key, (w, keep) in pruned_weights(model).items():
        assert torch.equal(got[key], w), key  # bit for bit
    for key in ("model.embed_tokens.weight", "model.norm.weight"):  # the rest passes through
        assert torch.equal(got[key], state[key]), key
    stored = load_file(str(out / "model.safetensors"))
    bitmask_bytes = stored["model.layers.0.mlp.up_proj.bitmask"].numel()
    assert bitmask_bytes == 128 * 64 // 8 and "model.layers.0.mlp.up_proj.weight" not in stored


def test_sparse_formats_refuse_what_they_cannot_hold(tmp_path):
    _, quantized = sparse_folder(tmp_path / "q", "2:4", "int8:channel")
    with pytest.raises(LowbitError, match="is quantized; compressed-tensors' sparse-bitmask format is written for "
                                          "float pruned models only"):
        export(quantized, "compressed-tensors", tmp_path / "a", sparse_format="sparse-bitmask")
    _, unstructured = sparse_folder(tmp_path / "u", "50%", None)
    with pytest.raises(LowbitError, match=r"model\.layers\.0\.\w+\.\w+ is not 2:4 sparse"):
        export(unstructured, "compressed-tensors", tmp_path / "b", sparse_format="sparse-24-bitmask")
    with pytest.raises(LowbitError, match="sparse format 'csr' unknown"):
        export(unstructured, "compressed-tensors", tmp_path / "c", sparse_format="csr")
    with pytest.raises(LowbitError, match="sparse format 'sparse-bitmask' is compressed-tensors'; gguf exports are"):
        export(unstructured, "gguf", tmp_path / "d.gguf", sparse_format="sparse-bitmask")
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c", "d.gguf"))


# --- ONNX -------------------------------------------------------------------------------------
ONNX_CASES = [("2:4", None), ("2:4", "int8:channel"), ("50%", "uint4:g32"), ("2:4-after", "int4:g32")]


def sparse_mlp(kind: str, scheme: str | None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = families.MLP().eval()
    if kind.endswith("-after"):
        lowbit.quantize(model, scheme, progress=False)
        from lowbit.nn.reference import attach

        for name, param, qt, dtype in list(quantized_tensors(model)):
            attach(model.get_submodule(name), param, replace(qt, mask=keep_mask(qt.dequantize(), "2:4")), dtype)
        return model
    prune(model, kind)
    return model if scheme is None else lowbit.quantize(model, scheme, progress=False)


@pytest.mark.parametrize("kind, scheme", ONNX_CASES)
def test_onnx_densifies_and_onnxruntime_reads_zeros_where_the_mask_says(kind, scheme, tmp_path, caplog):
    from lowbit.export.onnx import export_module

    model, x = sparse_mlp(kind, scheme), families.example_input("mlp")
    want = pruned_weights(model)
    assert len(want) == 3
    with caplog.at_level(logging.WARNING):
        path = export_module(model, (x,), tmp_path / "m.onnx")
    assert "onnx: ONNX QDQ has no sparse weight format; 3 pruned weights" in caplog.text
    np.testing.assert_allclose(run(path, x), families.output(model, x).numpy(), rtol=0, atol=ATOL)
    if scheme is None:  # float initializers, read with onnx's own numpy_helper
        read = [onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer]
    else:  # each weight as onnxruntime's own DequantizeLinear computes it
        read = list(dequantized(path, sorted(want), x).values())
    for key, (w, keep) in want.items():
        hits = [(y, k) for y in read for c, k in ((w.numpy(), keep), (w.numpy().T, keep.T))
                if y.shape == c.shape and np.array_equal(y.view(np.uint32), c.view(np.uint32))]
        assert hits, key  # bit for bit, +0.0 included
        y, k = hits[0]
        assert (y[~k.numpy()] == 0).all(), key


def test_onnx_llama_folder_with_masked_weights(tmp_path, caplog):
    """The CLI path: a saved, pruned-then-quantized Llama folder -> onnxruntime logits."""
    from test_onnx import session

    model, folder = sparse_folder(tmp_path / "q", "2:4-after", "int4:g32")
    with caplog.at_level(logging.WARNING):
        path = export(folder, "onnx", tmp_path / "llama.onnx")
    assert "14 pruned weights" in caplog.text
    ids = torch.randint(0, families.V, (2, 7), generator=torch.Generator().manual_seed(1))
    y = session(path).run(None, {"input_ids": ids.numpy()})[0]
    np.testing.assert_allclose(y, families.output(model, ids).numpy(), rtol=0, atol=ATOL)
