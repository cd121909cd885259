"""Tiny random models of every family lowbit must handle, built from configs."""
from __future__ import annotations

import torch
from torch import nn

V = 96  # vocabulary of the tiny language models


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64))


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(vocab_size=V, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2))


def qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=V, hidden_size=64, intermediate_size=96,
                                              moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              num_experts=4, num_experts_per_tok=2))


def bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=64))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


LANGUAGE = {"llama": llama, "qwen2": qwen2, "gpt2": gpt2, "mixtral": mixtral, "qwen2_moe": qwen2_moe}


def example_input(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        return torch.randn(4, 64, generator=g)
    if name == "cnn":
        return torch.randn(2, 1, 8, 8, generator=g)
    return torch.randint(0, V, (2, 12), generator=g)


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        y = model(x)
    if hasattr(y, "logits"):
        return y.logits
    if hasattr(y, "last_hidden_state"):
        return y.last_hidden_state
    return y
