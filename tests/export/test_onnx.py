"""ONNX QDQ export: run by onnxruntime and compared with lowbit's own model; weights read back exactly."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lowbit
from lowbit.nn.reference import quantized_tensors
from lowbit.errors import LowbitError
from lowbit.models.targets import default_plan
from lowbit.schemes import parse_scheme
from lowbit.scheme import Rule

import onnx  # noqa: E402 - a missing reader fails: scripts/install.sh installs the [export,test] extras
import onnxruntime as ort  # noqa: E402
import onnxscript  # noqa: E402,F401 - torch.onnx.export needs it
from lowbit.export import export  # noqa: E402
from lowbit.export.onnx import SUPPORTED, export_module  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import families  # noqa: E402

# Same float32 weights on both sides; only the order of float32 sums differs (ATen vs onnxruntime).
ATOL = 1e-5

# One scheme per layer, so every export covers three: MLP layers net.0 (128, 64), net.2 (64, 128),
# net.4 (10, 64); CNN layers features.0 (16, 1, 3, 3), features.2 (32, 16, 3, 3), head (10, 128).
# uint4:g48 on 128 columns, uint8:g24 on 128 and int4:g8 on 9 end in a partial group; b4x16 on 10 rows
# ends in a partial tile; conv groups run along the flattened in*kh*kw columns.
PLANS = {
    "mlp-a": ("mlp", ["int4:g32", "uint4:g48", "fp8_e4m3fn:channel"]),
    "mlp-b": ("mlp", ["int8:channel", "uint2:g64", "int3:b4x16"]),
    "cnn-a": ("cnn", ["int4:g8", "uint4:channel", "fp8_e5m2:g32"]),
    "cnn-b": ("cnn", ["uint8:tensor", "int8:b8x48", "uint8:g24"]),
    "mlp-ss": ("mlp", ["int4_ss:g32", "int8_ss:channel", "int3_ss:g16"]),  # negative scales
}
T = onnx.TensorProto
CODE_TYPES = {"int2": T.INT4, "int3": T.INT4, "int4": T.INT4, "int8": T.INT8, "uint2": T.UINT4, "uint4": T.UINT4,
              "uint8": T.UINT8, "fp8_e4m3fn": T.FLOAT8E4M3FN, "fp8_e5m2": T.FLOAT8E5M2}
LAYERS = {"mlp": ["net.0", "net.2", "net.4"], "cnn": ["features.0", "features.2", "head"]}


def quantized(kind: str, schemes: list[str]) -> torch.nn.Module:
    torch.manual_seed(0)
    model = {"mlp": families.MLP, "cnn": families.CNN}[kind]().eval()
    rules = [Rule(rf"^{name}$", parse_scheme(s)) for name, s in zip(LAYERS[kind], schemes)]
    return lowbit.quantize(model, rules, progress=False)


def session(model: Path | bytes, optimize: bool = True) -> "ort.InferenceSession":
    options = ort.SessionOptions()
    # onnxruntime fuses int4 DequantizeLinear + MatMul into MatMulNBits, which by default (level 4)
    # quantizes the activations to int8; level 0 keeps them float32, the numerics exported here.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(path: Path, x: torch.Tensor) -> np.ndarray:
    s = session(path)
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


def dequantized(path: Path, keys: list[str], x: torch.Tensor) -> dict[str, np.ndarray]:
    """Each weight as onnxruntime's own DequantizeLinear (and Reshape) compute it, unoptimized."""
    model = onnx.load(str(path))
    outputs = {}
    for key in keys:
        chain = [n for n in model.graph.node if n.name.startswith(f"{key}/")]
        assert chain and chain[0].op_type == "DequantizeLinear", key
        outputs[key] = chain[-1].output[0]
        model.graph.output.append(onnx.helper.make_tensor_value_info(outputs[key], onnx.TensorProto.FLOAT, None))
    s = session(model.SerializeToString(), optimize=False)
    values = s.run(list(outputs.values()), {s.get_inputs()[0].name: x.numpy()})
    return dict(zip(outputs, values))


def assert_weights_exact(path: Path, model: torch.nn.Module, x: torch.Tensor) -> None:
    qts: dict[str, object] = {}
    for m, p, qt, _ in sorted(quantized_tensors(model), key=lambda r: (r[0], r[1])):
        if all(qt is not seen for seen in qts.values()):  # tied weights: the first key names the nodes
            qts[f"{m}.{p}"] = qt
    for key, y in dequantized(path, sorted(qts), x).items():
        w = qts[key].dequantize().numpy()
        candidates = [c for c in (w, w.T) if c.shape == y.shape]  # MatMul weights are stored transposed
        assert any(np.array_equal(y.view(np.uint32), c.view(np.uint32)) for c in candidates), key


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """plan -> (model, example input, exported path), each exported once per module."""
    cache: dict[str, tuple] = {}

    def get(plan: str) -> tuple:
        if plan not in cache:
            kind, schemes = PLANS[plan]
            model, x = quantized(kind, schemes), families.example_input(kind)
            cache[plan] = model, x, export_module(model, (x,), tmp_path_factory.mktemp(plan) / "model.onnx")
        return cache[plan]

    return get


@pytest.mark.parametrize("plan", PLANS)
def test_outputs_and_weights_match_lowbit(plan, exported):
    kind, schemes = PLANS[plan]
    model, x, path = exported(plan)
    types = {i.name: i.data_type for i in onnx.load(str(path)).graph.initializer}
    for layer, scheme in zip(LAYERS[kind], schemes):  # codes, never a float copy of the weight
        assert types[f"{layer}.weight_quantized"] == CODE_TYPES[scheme.split(":")[0].removesuffix("_ss")], layer
        assert f"{layer}.weight" not in types
    np.testing.assert_allclose(run(path, x), families.output(model, x).numpy(), rtol=0, atol=ATOL)
    assert_weights_exact(path, model, x)


def test_reexport_is_byte_identical(exported, tmp_path):
    _, x, first = exported("mlp-a")
    again = export_module(quantized("mlp", PLANS["mlp-a"][1]), (x,), tmp_path / "again.onnx")
    assert again.read_bytes() == first.read_bytes()
    with pytest.raises(LowbitError, match="already exists"):
        export_module(quantized("mlp", PLANS["mlp-a"][1]), (x,), again)


@pytest.mark.parametrize("scheme", ["nf4:g32", "uint4_fz:g32", "mxfp4", "fp8_e4m3:channel", "nvfp4"])
def test_unsupported_scheme_is_refused(scheme, tmp_path):
    model = lowbit.quantize(families.MLP().eval(), scheme, progress=False)
    with pytest.raises(LowbitError) as e:
        export_module(model, (families.example_input("mlp"),), tmp_path / "m.onnx")
    assert parse_scheme(scheme).format.name in str(e.value) and SUPPORTED in str(e.value)
    assert not any(tmp_path.iterdir())  # nothing written, not even a temporary file


def test_packed_layers_are_refused(tmp_path):
    from lowbit.nn import pack_model

    model = pack_model(lowbit.quantize(families.MLP().eval(), "int8", progress=False))
    with pytest.raises(LowbitError, match="packed=False"):
        export_module(model, (families.example_input("mlp"),), tmp_path / "m.onnx")


def test_plain_module_folder_points_to_export_module(tmp_path):
    saved = lowbit.save(lowbit.quantize(families.MLP().eval(), "int8", progress=False), tmp_path / "q")
    with pytest.raises(LowbitError, match="export_module"):
        export(saved, "onnx", tmp_path / "m.onnx")


def test_llama_folder_exports_logits_with_dynamic_axes(tmp_path):
    """The CLI path: a saved HF causal LM -> input_ids (batch, sequence) -> logits.

    With one layer there are no repeated blocks, so the default plan quantizes lm_head too, which
    is tied to the embeddings: one QuantizedTensor feeds Gather (as is) and MatMul (transposed).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=families.V, hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True)).eval()
    plan = default_plan(model, parse_scheme("int4:g32")) + [Rule(r"down_proj$", parse_scheme("uint4:g16"))]
    lowbit.quantize(model, plan, progress=False)
    path = export(lowbit.save(model, tmp_path / "q"), "onnx", tmp_path / "llama.onnx")
    s = session(path)
    assert [i.name for i in s.get_inputs()] == ["input_ids"] and s.get_outputs()[0].name == "logits"
    g = torch.Generator().manual_seed(1)
    for shape in ((1, 5), (3, 11)):  # neither is the (2, 8) the exporter traced
        ids = torch.randint(0, families.V, shape, generator=g)
        y = s.run(None, {"input_ids": ids.numpy()})[0]
        np.testing.assert_allclose(y, families.output(model, ids).numpy(), rtol=0, atol=ATOL)
    assert_weights_exact(path, model, ids)
