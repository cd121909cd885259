"""lowbit: compress trained PyTorch and Hugging Face models.

``import lowbit`` is light: it does not import transformers. The model-facing API is loaded
lazily on first use.
"""
from __future__ import annotations

__version__ = "0.1.0"

from lowbit.errors import LowbitError  # noqa: E402
from lowbit.spec import PerBlock, PerChannel, PerGroup, PerTensor, QuantSpec, Rule  # noqa: E402

__all__ = ["LowbitError", "PerBlock", "PerChannel", "PerGroup", "PerTensor", "QuantSpec", "Rule", "__version__"]
