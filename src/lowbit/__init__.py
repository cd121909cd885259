"""lowbit: compress trained PyTorch and Hugging Face models.

``import lowbit`` is light: it never imports transformers; model-facing functions load what
they need on first use. It does register lowbit with transformers' quantizer registry as soon
as that is imported (``lowbit.hf.quantizer``), so ``AutoModelForCausalLM.from_pretrained`` loads
lowbit folders.
"""
from __future__ import annotations

from lowbit.errors import LowbitError  # noqa: E402
from lowbit.spec import PerBlock, PerChannel, PerGroup, PerTensor, QuantSpec  # noqa: E402
from lowbit.scheme import ActSpec, Rule, SparsitySpec, TensorScheme  # noqa: E402
from lowbit.hf.quantizer import install_hook as _install_hf_hook  # noqa: E402
from lowbit.version import __version__  # noqa: E402

_install_hf_hook()

__all__ = [
    "LowbitError", "PerBlock", "PerChannel", "PerGroup", "PerTensor", "QuantSpec", "Rule", "ActSpec",
    "SparsitySpec", "TensorScheme",
    "quantize", "save", "load", "load_model", "parse_scheme", "get_format", "__version__",
]


def __getattr__(name: str):
    if name in ("quantize", "save", "load"):
        from lowbit import api

        return getattr(api, name)
    if name == "load_model":
        from lowbit.hf.load import load_model

        return load_model
    if name == "parse_scheme":
        from lowbit.schemes import parse_scheme

        return parse_scheme
    if name == "get_format":
        from lowbit.formats.registry import get_format

        return get_format
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
