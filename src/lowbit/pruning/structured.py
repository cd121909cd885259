"""Structured pruning of a Hugging Face causal LM into a smaller DENSE model that transformers loads.

    >>> report = prune_structured(model, batches, structure="channels", sparsity=0.25)
    >>> model.save_pretrained(folder)   # AutoModelForCausalLM.from_pretrained(folder) loads it, no custom code

``structure``:

* ``"channels"``: intermediate channels of the gated MLP. Channel c is row c of gate and up and
  column c of down; removing it deletes all three. ``config.intermediate_size`` shrinks.
* ``"heads"``: whole KV groups of the attention: KV head g (rows of k and v) with all of its
  ``heads / kv_heads`` query heads (rows of q, columns of o). head_dim stays;
  ``num_attention_heads`` and ``num_key_value_heads`` shrink, ``head_dim`` is written into the
  config explicitly (its default, ``hidden_size // num_attention_heads``, would change).

The blocks (``lowbit.models.blocks.find_blocks``) are processed in order, as lowbit's engine
does: the first block's inputs are caught from the calibration batches, each block is run with
a hook on its consumer layer (down or o) that accumulates the Gram matrix G of that layer's
inputs, the groups to drop are chosen and the consumer is re-fitted by least squares
(``lowbit.algorithms.structured``), the smaller layers replace the old ones, and the pruned
block's outputs become the next block's inputs. Each layer chooses its own channels or groups.

Every layer removes the same number, ``n_removed(width, sparsity)`` = ``floor(sparsity · n + 0.5)``
capped so that one stays: stock transformers configs hold one ``intermediate_size`` and one
head count for all layers, so per-layer widths would not load without custom code and are not
offered. Only the inner widths change: embeddings (tied or not), norms and the hidden size stay.

Supported: blocks holding a gated MLP / q-k-v-o attention found by shape (``_structured_maps``):
Llama, Qwen2, Mistral, Gemma. Refused with a ``LowbitError``: GPT-2 (``Conv1D``), mixture-of-
experts MLPs, models whose blocks mix attention types (their blocks need different masks).

The report's per-layer errors are the consumer layer's relative squared output error on the
calibration inputs, ``Σ||W a − W' a_K||² / Σ||W a||²``: ``error_sliced`` with the kept columns as
they were, ``error`` with what was written (the refit when ``correct``).
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.algorithms.structured import CRITERIA, DAMP, choose_groups, column_groups, n_removed, refit, relative_error
from lowbit.engine.capture import BlockCall, catch_inputs
from lowbit.errors import LowbitError
from lowbit.models.blocks import find_blocks
from lowbit.pruning._structured_maps import Cut, attention_shape, find_attention, find_mlp

STRUCTURES = ("channels", "heads")
#: Measured on SmolLM2-135M, 25% of the MLP channels removed and re-fitted, calibrated on 32 pydoc windows
#: of 512 (bench/structured.py): "activation" gives perplexity 16.67 (pydoc) and 63.7 (prose), "hessian"
#: 16.77 and 68.3 (dense: 14.80 and 25.70), although "hessian" leaves the lower mean down_proj error on the
#: calibration data (0.0254 against 0.0266): its greedy choice fits pydoc more closely and generalises worse.
DEFAULT_CRITERION = "activation"


def prune_structured(model: nn.Module, batches: list[Tensor], *, structure: str, sparsity: float,
                     criterion: str = DEFAULT_CRITERION, correct: bool = True, progress: bool = True) -> dict:
    """Remove ``sparsity`` of the MLP channels or KV groups of every block, in place.

    Args:
        model: a transformers causal LM (module docstring for the families), any float dtype.
        batches: calibration token windows, each (B, T) int64.
        structure: ``"channels"`` or ``"heads"``.
        sparsity: fraction removed per layer, in [0, 1) (rounded as the module docstring says).
        criterion: ``"activation"`` or ``"hessian"`` (``lowbit.algorithms.structured``).
        correct: re-fit the consumer layer (down / o) by least squares; else keep its columns as they are.
        progress: a tqdm bar over the blocks.

    Returns a JSON-able report: settings, ``kept``/``removed`` per layer (channels or KV groups),
    per-layer ``error_sliced`` and ``error``, ``params_before``/``params_after`` and ``seconds``.
    """
    t0 = time.perf_counter()
    _check_args(structure, sparsity, criterion, batches)
    was_training = model.training
    model.eval()  # dropout off while the Gram matrices are gathered
    try:
        report = _prune(model, batches, structure, sparsity, criterion, correct, progress)
    finally:
        model.train(was_training)
    return {**report, "seconds": time.perf_counter() - t0}


def _prune(model: nn.Module, batches: list[Tensor], structure: str, sparsity: float, criterion: str, correct: bool,
           progress: bool) -> dict:
    found = find_blocks(model)
    if found is None:
        raise LowbitError(f"{type(model).__name__} has no repeated blocks; structured pruning needs a decoder LM")
    _, blocks = found
    config = _text_config(model)
    _check_layer_types(config)
    params_before = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    calls = catch_inputs(model, blocks[0], [b.to(device) for b in batches])
    hidden = [c.hidden for c in calls]
    shape = attention_shape(config) if structure == "heads" else None
    layers = []
    from tqdm.auto import tqdm

    for i, block in enumerate(tqdm(blocks, desc=f"pruning {structure}", disable=not progress)):
        where = f"block {i} of {type(model).__name__}"
        size = config.hidden_size
        cut = find_attention(block, calls[0], size, shape, where) if shape else find_mlp(block, size, where)
        layers.append({"block": i, **_prune_block(block, cut, calls, hidden, sparsity, criterion, correct)})
        with torch.no_grad():
            hidden = [c.run(block, h) for c, h in zip(calls, hidden)]
    _update_config(config, structure, layers, shape)
    return {"structure": structure, "sparsity": sparsity, "criterion": criterion, "correct": correct,
            "damp": DAMP, "calibration_tokens": sum(b.numel() for b in batches),
            "kept": layers[0]["kept"], "removed": layers[0]["removed"], "layers": layers,
            "params_before": params_before, "params_after": sum(p.numel() for p in model.parameters())}


def _check_args(structure: str, sparsity: float, criterion: str, batches: list[Tensor]) -> None:
    if structure not in STRUCTURES:
        raise LowbitError(f"unknown structure {structure!r}; structured pruning knows {', '.join(STRUCTURES)} "
                          "(MLP intermediate channels, or whole KV groups of attention heads)")
    if criterion not in CRITERIA:
        raise LowbitError(f"unknown criterion {criterion!r}; structured pruning knows {', '.join(CRITERIA)}")
    n_removed(1, sparsity)  # validates the range
    if not batches:
        raise LowbitError("no calibration batches; pass a list of (B, T) int64 token tensors")
    for b in batches:
        if not isinstance(b, Tensor) or b.dim() != 2 or b.dtype != torch.int64:
            what = f"{tuple(b.shape)} {b.dtype}" if isinstance(b, Tensor) else type(b).__name__
            raise LowbitError(f"calibration batch {what} is not a (B, T) int64 token tensor")


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "hidden_size"):
        raise LowbitError(f"{type(model).__name__} has no transformers config with hidden_size; structured pruning "
                          "edits the config so the saved folder loads")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _check_layer_types(config) -> None:
    types = set(getattr(config, "layer_types", None) or [])
    if len(types) > 1:
        raise LowbitError(f"this model mixes layer types {sorted(types)}, whose blocks receive different attention "
                          "masks; structured pruning runs the blocks one by one and does not support that")


def _gram(block: nn.Module, layer: nn.Linear, calls: list[BlockCall], hidden: list[Tensor]) -> Tensor:
    """(in, in) float64 Gram matrix Σ aaᵀ of ``layer``'s inputs while ``block`` runs on ``hidden``
    (each batch's product formed in float32, summed in float64)."""
    G = torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64, device=layer.weight.device)

    def hook(module: nn.Module, args: tuple) -> None:
        a = args[0].detach().reshape(-1, layer.in_features).float()  # (tokens, in)
        G.add_((a.T @ a).double())

    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for c, h in zip(calls, hidden):
                c.run(block, h)
    finally:
        handle.remove()
    return G


def _prune_block(block: nn.Module, cut: Cut, calls: list[BlockCall], hidden: list[Tensor], sparsity: float,
                 criterion: str, correct: bool) -> dict[str, Any]:
    mods = dict(block.named_modules())
    consumer = mods[cut.consumer]
    W = consumer.weight.detach()
    per = cut.heads // cut.kv_heads * cut.head_dim if cut.heads else 1  # consumer columns per group
    groups = column_groups(W.shape[1], per)  # (n_groups, per)
    n_remove = n_removed(groups.shape[0], sparsity)
    G = _gram(block, consumer, calls, hidden)
    keep_groups = choose_groups(W, G, groups, n_remove, criterion)
    keep = groups[keep_groups].reshape(-1)  # kept consumer columns, ascending
    W_new = refit(W, G, keep) if correct else W.double()[:, keep]
    out = {"kept": len(keep_groups), "removed": n_remove,
           "error_sliced": relative_error(W, G, keep, W.double()[:, keep]),
           "error": relative_error(W, G, keep, W_new)}
    _replace(block, cut.consumer, _linear(consumer, W_new.to(W.dtype), None))
    for name in cut.producers:
        _replace(block, name, _linear(mods[name], mods[name].weight.detach()[keep], keep))
    if cut.kv:
        kv_rows = column_groups(cut.kv_heads * cut.head_dim, cut.head_dim)[keep_groups].reshape(-1)
        for name in cut.kv:
            _replace(block, name, _linear(mods[name], mods[name].weight.detach()[kv_rows], kv_rows))
    return out


def _linear(old: nn.Linear, weight: Tensor, rows: Tensor | None) -> nn.Linear:
    """A new nn.Linear holding ``weight`` (out, in); its bias is ``old.bias[rows]`` (all of it when rows is None)."""
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=old.bias is not None, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if old.bias is not None:
            new.bias.copy_(old.bias if rows is None else old.bias[rows])
    new.train(old.training)
    return new


def _replace(block: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, new)


def _update_config(config, structure: str, layers: list[dict], shape: tuple[int, int, int] | None) -> None:
    if structure == "channels":
        config.intermediate_size = layers[0]["kept"]
        return
    heads, kv_heads, head_dim = shape
    kept = layers[0]["kept"]
    config.head_dim = head_dim
    config.num_attention_heads = heads // kv_heads * kept
    config.num_key_value_heads = kept
