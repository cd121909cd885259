"""compressed-tensors export, read back by the compressed-tensors package and by transformers.

The reference is always lowbit's own reconstruction, ``QuantizedTensor.dequantize()``; the
exported weights must decompress to it bit for bit.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

import compressed_tensors  # noqa: E402,F401 - a missing reader fails: scripts/install.sh installs the [test] extra
import transformers  # noqa: E402,F401

import lowbit  # noqa: E402
from lowbit import LowbitError  # noqa: E402
from lowbit.api import make_plan  # noqa: E402
from lowbit.export import export  # noqa: E402
from lowbit.export import compressed_tensors as ct_export  # noqa: E402
from lowbit.io import collect, read_manifest, read_weights, save  # noqa: E402
from lowbit.qtensor import QuantizedTensor  # noqa: E402
from lowbit.schemes import describe, parse_scheme  # noqa: E402
from lowbit.scheme import Rule  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import families  # noqa: E402

V = families.V
ROUND_TRIPS = ["int4:g32", "int4:g64", "uint4:g32", "int8:channel", "uint8:channel", "fp8_e4m3fn:channel",
               "fp8_e4m3fn:tensor", "int4:tensor", "uint4:b24x32", "fp8_e4m3fn:b24x48", "mixed", "int4_ss:g32"]


def tiny_llama(dtype: torch.dtype = torch.float32):
    """Input dims 64 and 128, so that groups of 32 and 64 divide every Linear."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def plan(model, case: str):
    """A scheme string, or "mixed": int4 g32 everywhere but fp8 for the MLP's down projections."""
    if case != "mixed":
        return case
    return [*make_plan(model, "int4:g32"), Rule(r"down_proj$", parse_scheme("fp8_e4m3fn:channel"))]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """case -> (quantized model, lowbit folder, export folder), built once per module."""
    cache: dict[str, tuple] = {}

    def make(case: str, sharded: bool = False, dtype: torch.dtype = torch.float32):
        name = f"{case}-{sharded}-{dtype}".replace(":", "_").replace("torch.", "")
        if name not in cache:
            model = tiny_llama(dtype)
            lowbit.quantize(model, plan(model, case), progress=False)
            root = tmp_path_factory.mktemp(name)
            chunks = [collect(model, skip="model.layers.1."),
                      collect(model.model.layers[1], prefix="model.layers.1.")] if sharded else None
            save(model, root / "lowbit", chunks=chunks)
            cache[name] = (model, root / "lowbit", export(root / "lowbit", "compressed-tensors", root / "ct"))
        return cache[name]

    return make


def safetensors_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def decompress(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export, decompressed by compressed-tensors' own model-free dequantizer
    (it parses the config, matches targets and fails on leftover quantization parameters)."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    return CompressedTensorsDequantizer(folder, dtype=torch.float32).validate(safetensors_of(folder))


def lowbit_weights(folder: Path) -> dict[str, torch.Tensor]:
    """lowbit's reconstruction of each quantized weight, the other tensors as saved, aliases spelled out."""
    manifest, tensors = read_manifest(folder), read_weights(folder)
    out = {}
    for key, meta in manifest["quantized"].items():
        parts = {r: tensors.pop(f"{key}.{r}") for r in ("codes", "scale", "zero", "global_scale")
                 if f"{key}.{r}" in tensors}
        out[key] = QuantizedTensor.from_tensors(meta, parts).dequantize()
    out.update(tensors)
    out.update({alias: out[source] for alias, source in manifest["aliases"].items()})
    return out


@pytest.mark.parametrize("case", ROUND_TRIPS)
def test_decompressed_weights_equal_lowbit(exported, case):
    _, src, out = exported(case)
    got, want = decompress(out), lowbit_weights(src)
    assert set(want) - set(got) == {"lm_head.weight"}  # tied to the embedding: HF keeps the embedding only
    for key, t in got.items():
        assert t.dtype == want[key].dtype and torch.equal(t, want[key]), key


def test_sharded_input_gives_sharded_output(exported):
    _, src, out = exported("int4:g32", sharded=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(p.name for p in src.glob("*.safetensors"))
    assert set(index["weight_map"]) == set(safetensors_of(out))
    got, want = decompress(out), lowbit_weights(src)
    assert all(torch.equal(t, want[k]) for k, t in got.items())


def test_config_and_tensors(exported):
    _, src, out = exported("uint4:g32")
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    quantized = sorted(k.removesuffix(".weight") for k in read_manifest(src)["quantized"])
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == (
        "compressed-tensors", "pack-quantized", "compressed")
    assert qc["ignore"] == ["lm_head"] and qc["kv_cache_scheme"] is None
    assert list(qc["config_groups"]) == ["group_0"]
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == quantized and group["format"] == "pack-quantized"
    assert group["weights"] == {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                "group_size": 32, "dynamic": False, "actorder": None}
    from compressed_tensors.quantization import QuantizationConfig
    from transformers.utils.quantization_config import CompressedTensorsConfig

    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.config_groups["group_0"].weights.group_size == 32
    assert CompressedTensorsConfig.from_dict(config).quantization_config.ignore == ["lm_head"]
    tensors = safetensors_of(out)
    m = "model.layers.0.mlp.down_proj"  # (64, 128): 16 words per row, zero points packed down 64 rows
    assert tensors[f"{m}.weight_packed"].dtype == torch.int32 and tensors[f"{m}.weight_packed"].shape == (64, 16)
    assert tensors[f"{m}.weight_zero_point"].dtype == torch.int32 and tensors[f"{m}.weight_zero_point"].shape == (8, 4)
    assert tensors[f"{m}.weight_scale"].dtype == torch.float32 and tensors[f"{m}.weight_scale"].shape == (64, 4)
    assert tensors[f"{m}.weight_shape"].tolist() == [64, 128]
    assert "lm_head.weight" not in tensors and config["dtype"] == "float32"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_tokenizer_is_copied(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "low": 1, "bit": 2}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                        unk_token="<unk>")
    model = tiny_llama()
    lowbit.quantize(model, "int4:g32", progress=False)
    src = lowbit.save(model, tmp_path / "lowbit", tokenizer=tokenizer)
    out = export(src, "compressed-tensors", tmp_path / "ct")
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(["bit", "low"]) == [2, 1]
    assert not (out / "lowbit.json").exists()


def test_mixed_schemes_get_one_group_each(exported):
    _, _, out = exported("mixed")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"
    formats = {g["format"]: g for g in qc["config_groups"].values()}
    assert set(formats) == {"pack-quantized", "float-quantized"}
    assert formats["float-quantized"]["targets"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert formats["float-quantized"]["weights"]["strategy"] == "channel"
    assert len(formats["pack-quantized"]["targets"]) == 12


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_matches_compressed_tensors(bits):
    """Independent reference: compressed-tensors' own packer, on odd widths and every code."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(bits)
    for cols in (1, 7, 8, 33, 64, 100):
        codes = torch.randint(0, 2**bits, (5, cols), generator=g, dtype=torch.uint8)
        codes[0, : min(cols, 2**bits)] = torch.arange(min(cols, 2**bits), dtype=torch.uint8)
        theirs = pack_to_int32((codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8), bits)
        assert torch.equal(ct_export.pack_int32(codes, bits), theirs), cols


@pytest.mark.parametrize("case", ["int4:g32", "int8:channel", "fp8_e4m3fn:channel", "mixed", "int4_ss:g32"])
def test_transformers_loads_export_with_identical_logits(exported, case):
    # Asymmetric (uint) exports are left out: transformers builds the zero point unpacked on the
    # meta device and refuses the packed tensor (vllm-project/llm-compressor#1618, also for
    # llm-compressor's own asymmetric checkpoints); vLLM and the dequantizer above read them.
    from transformers import AutoModelForCausalLM

    model, _, out = exported(case)
    x = families.example_input("llama")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(families.output(reloaded, x), families.output(model, x))


def test_bf16_model_with_bf16_scales_loads_exactly(exported, caplog):
    """transformers casts scales to the model dtype: exact when the spec's scales are already bf16."""
    from transformers import AutoModelForCausalLM

    model, _, out = exported("int4:g32:scale=bfloat16", dtype=torch.bfloat16)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    families.output(reloaded, families.example_input("llama"))  # the first forward decompresses
    state = reloaded.state_dict()
    for key, w in model.state_dict().items():
        assert torch.equal(state[key], w), key
    with caplog.at_level("WARNING", logger=ct_export.__name__):
        exported("int4:g32", dtype=torch.bfloat16)
    assert ":scale=bfloat16" in caplog.text


def quantized_folder(tmp_path: Path, build, scheme: str) -> Path:
    model = build()
    lowbit.quantize(model, scheme, progress=False)
    return lowbit.save(model, tmp_path / "lowbit")


@pytest.mark.parametrize("scheme", ["uint4_fz:g32", "nf4:g32", "mxfp4", "nvfp4", "int3:g32", "fp8_e5m2:channel",
                                    "fp8_e4m3:channel"])
def test_unrepresentable_scheme_is_refused(tmp_path, scheme):
    src = quantized_folder(tmp_path, tiny_llama, scheme)
    spec_text = describe(parse_scheme(scheme))
    with pytest.raises(LowbitError, match=re.escape(spec_text)) as err:
        export(src, "compressed-tensors", tmp_path / "ct")
    assert ct_export.SUPPORTED in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lowbit"]


@pytest.mark.parametrize("build, scheme, message", [
    (lambda: families.llama().eval(), "int4:g64", "partial last group .*96 input columns.*g16, g32 or channel"),
    (lambda: families.gpt2().eval(), "int4:g32", "c_attn.weight \\(Conv1D"),
    (lambda: families.MLP().eval(), "int8:channel", "no Hugging Face model"),
])
def test_unexportable_model_is_refused(tmp_path, build, scheme, message):
    torch.manual_seed(0)
    src = quantized_folder(tmp_path, build, scheme)
    with pytest.raises(LowbitError, match=message):
        export(src, "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_write_is_atomic(exported, tmp_path, monkeypatch):
    _, src, _ = exported("int4:g32")
    out = tmp_path / "ct"
    out.mkdir()
    (out / "old.txt").write_text("keep")
    with pytest.raises(LowbitError, match="already exists"):
        export(src, "compressed-tensors", out)
    assert (out / "old.txt").read_text() == "keep"

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ct_export, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export(src, "compressed-tensors", out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"] and (out / "old.txt").exists()
    monkeypatch.undo()
    export(src, "compressed-tensors", out, overwrite=True)
    assert not (out / "old.txt").exists() and "quantization_config" in (out / "config.json").read_text()
