"""Rate-distortion curves of a language model's layers, measured at its output (§15 on LLMs).

The §15 allocation (Xu et al., ICCV'23, arXiv:2308.10438; ``lowbit.algorithms.rd_allocation``)
needs, for every prunable layer l and amount j/K, the distortion of the model's output with only
layer l magnitude-pruned by that amount:

    δ_l(j) = mean over calibration tokens of ||Y − Ŷ||²    (Y: (vocab,) logits of the unpruned model)

as ``lowbit.pruning.rd_curves`` measures it for small models. An LLM needs two savings to make that
affordable, both exact (neither changes δ beyond float rounding):

* **No logits.** The head is a Linear ``W_head`` (vocab, d), so with h the head's input,
  ``||Y − Ŷ||² = (h − ĥ)ᵀ G (h − ĥ)`` with ``G = W_headᵀ W_head`` (d, d), computed once in float64.
  The head's forward is replaced, for the measurement only, by one that records its input.
* **No prefix.** Blocks before the pruned layer's block see unchanged weights, so they return the
  outputs recorded in the reference pass instead of running again.

Each layer then costs K forwards of the blocks from its own onward, over ``tokens`` calibration
tokens.

``criterion`` picks which weights an amount prunes: "magnitude" (the paper's: the smallest |w| of
the layer) or "wanda" (the smallest |w_ij|·‖x_j‖ of each row, with ‖x_j‖ the layer's input column
norms on the same tokens, recorded in the reference pass): the curve of the method that will prune. Our choices, not the paper's (which prunes small vision models with K = 100): K = 10 by
default, and the first ``tokens`` tokens of the calibration windows. A head with logit soft-capping
(Gemma 2) is measured before the cap. The weights are restored after each layer; the model is
unchanged on return.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.algorithms.rd_allocation import grid_pruned
from lowbit.errors import LowbitError
from lowbit.models.blocks import find_blocks


def calibration_tokens(batches: Sequence[Tensor], tokens: int) -> Tensor:
    """(rows, T) int64 token ids: the first windows of ``batches`` holding ``tokens`` tokens (at
    least one window, cut to ``tokens`` columns when one window is longer)."""
    if not batches or not all(isinstance(b, Tensor) and b.ndim == 2 for b in batches):
        raise LowbitError("allocation=rd measures curves on (batch, tokens) token windows; pass calibration "
                          "windows such as lowbit.calib.calibration_windows(tokenizer, 'pydoc', 32, 512)")
    if tokens < 1:
        raise LowbitError(f"rd_tokens {tokens} must be a positive number of calibration tokens, e.g. 256")
    windows = torch.cat(list(batches))  # (N, T)
    width = windows.shape[1]
    if tokens <= width:
        return windows[:1, :tokens]
    return windows[:-(-tokens // width)]


CRITERIA = ("magnitude", "wanda")


@torch.no_grad()
def output_curves(model: nn.Module, weights: Sequence[tuple[str, Tensor]], x: Tensor, steps: int = 10, *,
                  keep: Sequence[int] | None = None, criterion: str = "magnitude",
                  progress: bool = True) -> list[Tensor]:
    """One (steps + 1,) float64 curve per weight: δ at amounts 0, 1/steps, ..., 1 (δ[0] = 0).

    model:   a causal LM whose ``get_output_embeddings()`` is a Linear, with repeated blocks.
    weights: (parameter name, the parameter itself) for every layer to measure.
    x:       (rows, T) int64 token ids (``calibration_tokens``).
    keep:    per weight, the fewest weights that must stay (default 1: no layer pruned whole); an
             amount keeping fewer is +inf (forbidden to ``rate_distortion``) and is not measured.
    Amount j/steps prunes, with criterion "magnitude", the ``grid_pruned(n, j, steps)`` smallest |w|
    of the layer (stable order, as ``lowbit.algorithms.magnitude.magnitude_mask``); with "wanda", the
    ``grid_pruned(cols, j, steps)`` lowest |w_ij|·‖x_j‖ of each row (2-D weights of Linear layers).
    """
    if criterion not in CRITERIA:
        raise LowbitError(f"rd curve criterion {criterion!r} unknown; use one of {', '.join(CRITERIA)}")
    if steps < 1:
        raise LowbitError(f"rd_steps {steps} must be >= 1 (amounts j/steps for j = 0..steps)")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = find_blocks(model)
    if not isinstance(head, nn.Linear) or found is None:
        raise LowbitError("allocation=rd measures each layer's effect on a language model's logits and needs a "
                          "model with repeated blocks and a Linear output layer; for small models use "
                          "lowbit.pruning.rd_curves, or pick allocation=erk or lamp")
    prefix, blocks = found
    block_of = [_block_index(name, prefix, len(blocks)) for name, _ in weights]
    G = head.weight.detach().double().T @ head.weight.detach().double()  # (d, d)
    extra = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
    seen: list[Tensor] = []
    recorded: list[object] = [None] * len(blocks)

    def record_head(h: Tensor) -> Tensor:
        seen.append(h.detach().reshape(-1, h.shape[-1]).double())  # (tokens, d)
        return h.new_zeros(*h.shape[:-1], 1)

    def record_block(i: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            recorded[i] = output
        return hook

    if any("forward" in m.__dict__ for m in (head, *blocks)):
        raise LowbitError("allocation=rd replaces the forward of the output layer and the blocks while it measures, "
                          "but this model has already replaced one (hooks from another library?); load it plainly")
    handles: list = []
    norms: dict[str, Tensor] = {}
    try:
        handles += [b.register_forward_hook(record_block(i)) for i, b in enumerate(blocks)]
        if criterion == "wanda":
            handles += [_input_norms(model, name, w, norms) for name, w in weights]
        head.forward = record_head
        model(x, **extra)
        for h in handles:
            h.remove()
        handles = []
        reference = seen.pop()
        curves = []
        keep = [1] * len(weights) if keep is None else list(keep)
        for (name, w), b, k in tqdm(list(zip(weights, block_of, keep)), desc="rd curves", unit="layer",
                                    disable=not progress):
            top = max(j for j in range(steps + 1) if w.numel() - grid_pruned(w.numel(), j, steps) >= min(k, w.numel()))
            prune = _pruner(w.detach(), norms.get(name), steps)
            if w is head.weight:
                curve = _head_curve(w, prune, reference, top)
            else:
                curve = _curve(model, blocks, recorded, b, w, prune, x, top, extra, G, reference, seen)
            curves.append(torch.cat([curve, torch.full((steps - top,), torch.inf, dtype=torch.float64)]))
        return curves
    finally:
        for h in handles:
            h.remove()
        head.__dict__.pop("forward", None)
        for blk in blocks:
            blk.__dict__.pop("forward", None)


def _input_norms(model: nn.Module, name: str, w: Tensor, norms: dict):
    """A forward pre-hook on ``name``'s Linear that stores its inputs' squared column norms, (cols,) float64."""
    module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else None
    if not isinstance(module, nn.Linear) or module.weight is not w:
        raise LowbitError(f"rd curves with the wanda criterion need Linear weights; {name} is not one (use "
                          "method magnitude for it)")

    def hook(mod: nn.Module, args: tuple) -> None:
        norms[name] = args[0].detach().reshape(-1, args[0].shape[-1]).double().square().sum(0)
    return module.register_forward_pre_hook(hook)


def _pruner(w: Tensor, col_sq: Tensor | None, steps: int):
    """j -> the weight with amount j/steps pruned: by |w| over the layer, or (given the input column
    norms²) by |w_ij|·‖x_j‖ within each row."""
    if col_sq is None:
        order = torch.sort(w.abs().reshape(-1), stable=True).indices  # smallest first

        def prune(j: int) -> Tensor:
            flat = w.reshape(-1).clone()
            flat[order[:grid_pruned(w.numel(), j, steps)]] = 0.0
            return flat.reshape(w.shape)
        return prune
    rows_order = torch.sort(w.abs().double() * col_sq.sqrt(), dim=1, stable=True).indices  # (rows, cols)

    def prune(j: int) -> Tensor:
        drop = rows_order[:, :grid_pruned(w.shape[1], j, steps)]
        return w.clone().scatter_(1, drop, 0.0)
    return prune


def _curve(model: nn.Module, blocks: nn.ModuleList, recorded: list, b: int, w: Tensor, prune, x: Tensor, top: int,
           extra: dict, G: Tensor, reference: Tensor, seen: list) -> Tensor:
    """(top + 1,) δ of one weight at amounts j/steps for j ≤ top, skipping the blocks before block
    ``b`` (their outputs recorded)."""
    for i, blk in enumerate(blocks):
        if i < b:
            blk.forward = _replay(recorded[i])
        else:
            blk.__dict__.pop("forward", None)
    original = w.detach().clone()
    curve = torch.zeros(top + 1, dtype=torch.float64)
    try:
        for j in range(1, top + 1):
            w.data.copy_(prune(j))
            model(x, **extra)
            d = seen.pop() - reference  # (tokens, d)
            curve[j] = ((d @ G) * d).sum(1).mean()
    finally:
        w.data.copy_(original)
    return curve


def _head_curve(w: Tensor, prune, h: Tensor, top: int) -> Tensor:
    """(top + 1,) δ of the (untied) output layer itself: mean over tokens of ||h ΔWᵀ||², h (tokens, d)."""
    curve = torch.zeros(top + 1, dtype=torch.float64)
    for j in range(1, top + 1):
        delta = (w.detach() - prune(j)).double()  # the pruned weights, zero elsewhere
        curve[j] = (h @ delta.T).square().sum(1).mean()
    return curve


def _replay(output: object):
    """A block forward that returns its recorded output (tensors cloned, so nothing downstream can
    change the record in place)."""
    def forward(*args, **kwargs):
        return _clone(output)
    return forward


def _clone(o: object) -> object:
    if isinstance(o, Tensor):
        return o.clone()
    if isinstance(o, (tuple, list)):
        return type(o)(_clone(v) for v in o)
    return o


def _block_index(name: str, prefix: str, count: int) -> int:
    """Index of the block holding parameter ``name``; 0 (run every block) for one outside the blocks."""
    head = f"{prefix}." if prefix else ""
    if name.startswith(head):
        first = name[len(head):].split(".", 1)[0]
        if first.isdigit() and int(first) < count:
            return int(first)
    return 0
