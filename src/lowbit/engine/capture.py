"""Catch what the first repeated block receives, without tracing.

The blocks are found by ``lowbit.models.blocks.find_blocks``. ``catch_inputs`` runs the model on each
calibration batch until the first block is called, and keeps everything that block received:
the hidden states, the other positional arguments and the keyword arguments (attention masks,
position ids, rotary position embeddings, cache positions). Later blocks get the same extra
arguments with the previous block's output as hidden states.

A model without repeated blocks (a plain MLP or CNN) is one block: the model itself, whose input
is the calibration batch.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError


@dataclass
class BlockCall:
    """How the first block is called for one batch; ``hidden`` is swapped block after block."""

    args: tuple  # positional arguments; ``args[0]`` is the hidden state when ``hidden_kw`` is None
    kwargs: dict[str, Any] = field(default_factory=dict)
    hidden_kw: str | None = None  # the keyword that carries the hidden state, if not positional

    @property
    def hidden(self) -> Tensor:
        return self.kwargs[self.hidden_kw] if self.hidden_kw else self.args[0]

    def run(self, block: nn.Module, hidden: Tensor) -> Tensor:
        """Call ``block`` on ``hidden`` with the caught extra arguments; returns the new hidden state."""
        if self.hidden_kw:
            out = block(*self.args, **{**self.kwargs, self.hidden_kw: hidden})
        else:
            out = block(hidden, *self.args[1:], **self.kwargs)
        return block_output(out, block)


def block_output(out: Any, block: nn.Module) -> Tensor:
    """The hidden state a block returns: a tensor, or the first item of a tuple or model output."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple"):
        first = out[0]
        if isinstance(first, Tensor):
            return first
    raise LowbitError(f"{type(block).__name__} returned {type(out).__name__}, not a tensor or a tuple "
                      "starting with one; the calibration runner cannot follow its output")


class _Caught(Exception):
    def __init__(self, call: BlockCall) -> None:
        super().__init__("first block reached")
        self.call = call


def catch_inputs(model: nn.Module, first_block: nn.Module | None, batches: list[Tensor]) -> list[BlockCall]:
    """One ``BlockCall`` per batch: what ``first_block`` receives when ``model`` runs on it.

    batches: model inputs, e.g. (B, T) int64 token ids. With ``first_block=None`` the model is
    its own block and each batch is its hidden state.
    """
    if first_block is None:
        return [BlockCall((b,)) for b in batches]

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args:
            raise _Caught(BlockCall(tuple(args), dict(kwargs)))
        if "hidden_states" in kwargs:
            raise _Caught(BlockCall((), dict(kwargs), "hidden_states"))
        raise LowbitError(f"{type(module).__name__} was called without positional arguments or hidden_states=; "
                          "the calibration runner cannot tell which argument is the hidden state")

    extra = {"use_cache": False} if _accepts(model, "use_cache") else {}
    calls = []
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(batch, **extra)
                except _Caught as caught:
                    calls.append(caught.call)
                    continue
                raise LowbitError(f"the model ran without calling its first block {type(first_block).__name__}; "
                                  "the calibration runner needs a model that calls its repeated blocks")
    finally:
        handle.remove()
    return calls


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
