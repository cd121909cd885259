"""Where structured pruning cuts inside one block: the gated MLP and the q/k/v/o attention,
found by module type, shape and call order (no module names, no per-architecture files).

* **MLP**: a module whose direct ``nn.Linear`` children are exactly three, two reading the
  hidden size and writing I (gate and up, in either order) and one reading I and writing the hidden
  size (down), I ≠ hidden. Llama, Qwen2, Mistral and Gemma have it; GPT-2 (``Conv1D``) and
  mixture-of-experts blocks do not.
* **Attention**: a module whose direct ``nn.Linear`` children are exactly four; o is the one the
  block calls last, q writes ``heads · head_dim`` rows and k, v write ``kv_heads · head_dim`` rows
  (k and v need not be told apart: both lose the same rows). ``heads``, ``kv_heads`` and
  ``head_dim`` come from the config (``num_attention_heads``, ``num_key_value_heads``,
  ``head_dim`` or ``hidden_size // num_attention_heads``) and are checked against the shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.engine.capture import BlockCall
from lowbit.errors import LowbitError

KNOWN = "Llama, Qwen2, Mistral and Gemma"


@dataclass(frozen=True)
class Cut:
    """Linear layers (names inside the block) whose output rows go (``producers``: channel rows;
    ``kv``: KV-head rows) and the one whose input columns go (``consumer``)."""

    producers: tuple[str, ...]
    consumer: str
    kv: tuple[str, ...] = ()
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0


def linear_children(module: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    base = prefix + "." if prefix else ""
    return {base + n: c for n, c in module.named_children() if isinstance(c, nn.Linear)}


def call_order(block: nn.Module, call: BlockCall) -> list[str]:
    """Names of the block's ``nn.Linear`` layers in the order one forward pass calls them."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name))
               for name, m in block.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            call.run(block, call.hidden)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


def find_mlp(block: nn.Module, hidden: int, where: str) -> Cut:
    """The gated MLP of ``block`` (module docstring); ``where`` names the block in the error."""
    for prefix, module in block.named_modules():
        lin = linear_children(module, prefix)
        if len(lin) != 3:
            continue
        down = [n for n, m in lin.items() if m.out_features == hidden and m.in_features != hidden]
        if len(down) != 1:
            continue
        width = lin[down[0]].in_features
        ups = tuple(n for n, m in lin.items() if m.in_features == hidden and m.out_features == width)
        if len(ups) == 2:
            return Cut(ups, down[0])
    raise LowbitError(f"no gate/up/down MLP found in {where}; structured pruning knows a module holding exactly "
                      f"three nn.Linear layers, two ({hidden} -> I) and one (I -> {hidden}), as in {KNOWN}")


def attention_shape(config) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim) from a transformers config."""
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        raise LowbitError(f"{type(config).__name__} has no num_attention_heads; structured head pruning "
                          f"knows the attention of {KNOWN}")
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def find_attention(block: nn.Module, call: BlockCall, hidden: int, shape: tuple[int, int, int], where: str) -> Cut:
    """q/k/v/o of ``block`` (module docstring); ``shape`` = (heads, kv_heads, head_dim)."""
    heads, kv_heads, head_dim = shape
    order = None
    for prefix, module in block.named_modules():
        lin = linear_children(module, prefix)
        if len(lin) != 4:
            continue
        order = order or call_order(block, call)
        called = [n for n in order if n in lin]
        if len(called) != 4:
            continue
        o, rest = called[-1], called[:-1]
        q = next((n for n in rest if lin[n].out_features == heads * head_dim), None)
        kv = tuple(n for n in rest if n != q)
        if (q is not None and lin[o].in_features == heads * head_dim and lin[o].out_features == hidden
                and all(lin[n].in_features == hidden for n in rest)
                and all(lin[n].out_features == kv_heads * head_dim for n in kv)):
            return Cut((q,), o, kv, heads, kv_heads, head_dim)
    raise LowbitError(f"no q/k/v/o attention found in {where}; structured head pruning knows a module holding "
                      f"exactly four nn.Linear layers: q ({hidden} -> {heads}·{head_dim}), k and v ({hidden} -> "
                      f"{kv_heads}·{head_dim}) and o ({heads}·{head_dim} -> {hidden}), called last, as in {KNOWN}")
