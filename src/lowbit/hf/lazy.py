"""A Hugging Face model whose weights stay on disk until the runner needs them.

``open_streamed(folder)`` builds the model from ``config.json`` with parameters on the meta
device (buffers such as rotary frequencies are real), fills everything outside the repeated
blocks from the memory-mapped safetensors, and returns the pieces ``engine.runner.calibrate`` and
``io.save`` need to go block by block. It returns None when the checkpoint's tensor names do
not match the model's own (transformers renames or fuses some on load, e.g. MoE experts), in
which case the caller loads the model whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from lowbit.hf.load import _model_class, _tokenizer, transformers
from lowbit.hf.weights import WeightSource, empty, fill, missing_keys
from lowbit.models.blocks import find_blocks


@dataclass
class Streamed:
    model: nn.Module
    tokenizer: Any
    source: WeightSource
    blocks_name: str
    blocks: nn.ModuleList

    def load(self, block: nn.Module, prefix: str) -> None:
        fill(self.model, block, prefix, self.source)

    def release(self, block: nn.Module) -> None:
        empty(block)

    def block_bytes(self) -> int:
        """Bytes on disk of the largest block."""
        return max(self.source.nbytes(f"{self.blocks_name}.{i}.") for i in range(len(self.blocks)))


def open_streamed(folder: Path) -> Streamed | None:
    """The model in ``folder`` with only its non-block weights in memory, or None (see module doc)."""
    from accelerate import init_empty_weights

    tf = transformers()
    config = tf.AutoConfig.from_pretrained(str(folder))
    cls = _model_class(tf, config)
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # on the meta device the tie is not made at construction
    model.eval()
    source = WeightSource(folder)
    found = find_blocks(model)
    if found is None or missing_keys(model, source):
        return None
    name, blocks = found
    fill(model, model, "", source, skip=f"{name}.")
    return Streamed(model, _tokenizer(tf, folder), source, name, blocks)


def save_chunks(streamed: Streamed, restore: Any) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """One chunk per block (its weights from disk plus its quantized tensors), then the rest.

    ``restore(i, block)`` puts block ``i``'s quantized tensors back (from the run's checkpoint).
    """
    from lowbit.io import collect

    prefix = f"{streamed.blocks_name}."
    for i, block in enumerate(streamed.blocks):
        streamed.load(block, f"{prefix}{i}.")
        restore(i, block)
        yield collect(block, prefix=f"{prefix}{i}.")
        streamed.release(block)
    yield collect(streamed.model, skip=prefix)
