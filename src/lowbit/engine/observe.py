"""Feed every layer's inputs to a statistics accumulator while a block runs.

``observe(block_targets, new_stats)`` is a context manager: inside it, each forward of the block
passes the input of every target layer, flattened to ``(tokens, in_features)``, to that layer's
accumulator (``stats.update(x)``).

* Layers that receive the very same input tensor in one forward (q/k/v, gate/up) share one
  accumulator: the input is accumulated once, and the followers point at the leader's object.
* Fused MoE expert tensors ``(E, out, in)`` are not modules: a ``TorchFunctionMode`` watches
  ``F.linear`` / ``matmul`` calls whose weight is a slice ``W[e]`` of a tracked tensor, and
  accumulates per expert. Experts that see no token get no accumulator (the runner falls back
  and reports them).
* Convolutions and embeddings get no accumulator (the runner rounds them to nearest).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

NewStats = Callable[[int], Any]  # in_features -> accumulator with .update(x: (tokens, in_features))


@dataclass
class Observed:
    """Accumulators filled by ``observe``: per tensor key, and per (key, expert) for fused experts."""

    layers: dict[str, Any] = field(default_factory=dict)
    shared_with: dict[str, str] = field(default_factory=dict)  # follower key -> leader key
    experts: dict[str, dict[int, Any]] = field(default_factory=dict)


@contextmanager
def observe(targets: list[tuple[str, nn.Module, str, str]], new_stats: NewStats) -> Iterator[Observed]:
    """Accumulate inputs of ``targets`` = [(key, module, param, kind)] while the block runs.

    kind: "linear" (nn.Linear, GPT-2 Conv1D), "experts" (3-D fused tensor), others are ignored.
    Call the yielded object's ``reset()`` after each forward: it drops the inputs kept alive
    to recognise shared inputs.
    """
    observed = Observed()
    seen: dict[int, tuple[Tensor, str]] = {}  # id(input) -> (input kept alive, leader key), per forward
    handles = []
    for key, module, _param, kind in targets:
        if kind == "linear":
            handles.append(module.register_forward_pre_hook(_linear_hook(key, observed, seen, new_stats)))
    experts = {key: (module, param) for key, module, param, kind in targets if kind == "experts"}
    mode = _ExpertInputs(experts, observed, new_stats) if experts else None
    observed.reset = seen.clear  # type: ignore[attr-defined]
    try:
        if mode is None:
            yield observed
        else:
            with mode:
                yield observed
    finally:
        for h in handles:
            h.remove()
        seen.clear()


def _linear_hook(key: str, observed: Observed, seen: dict, new_stats: NewStats):
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0]
        leader = seen.get(id(x))
        if leader is not None and leader[0] is x:  # same tensor object as an earlier layer's input
            if key not in observed.layers:
                observed.layers[key] = observed.layers[leader[1]]
                observed.shared_with[key] = leader[1]
            return
        seen[id(x)] = (x, key)  # keeping x alive means its id cannot be reused in this forward
        if observed.shared_with.get(key):
            return  # it shared an input in an earlier forward
        x2 = x.detach().reshape(-1, x.shape[-1])  # (tokens, in_features)
        if key not in observed.layers:
            observed.layers[key] = new_stats(x2.shape[1])
        observed.layers[key].update(x2)

    return hook


class _ExpertInputs(TorchFunctionMode):
    """Catch per-expert inputs of fused expert tensors used through ``F.linear`` or ``matmul``."""

    def __init__(self, experts: dict[str, tuple[nn.Module, str]], observed: Observed, new_stats: NewStats) -> None:
        super().__init__()
        self.experts = experts
        self.observed = observed
        self.new_stats = new_stats

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear and len(args) >= 2:
            self._record(args[0], args[1], transposed=False)
        elif func in (torch.matmul, Tensor.__matmul__, Tensor.matmul) and len(args) == 2:
            self._record(args[0], args[1], transposed=True)
        return func(*args, **kwargs)

    def _record(self, x: Any, w: Any, transposed: bool) -> None:
        if not isinstance(w, Tensor) or not isinstance(x, Tensor) or w.dim() != 2:
            return
        for key, (module, param) in self.experts.items():
            full = getattr(module, param)
            e = _expert_index(full, w.t() if transposed else w)
            if e is None:
                continue
            x2 = x.detach().reshape(-1, x.shape[-1])  # (tokens, in_features)
            if x2.shape[0] == 0:
                return
            per_expert = self.observed.experts.setdefault(key, {})
            if e not in per_expert:
                per_expert[e] = self.new_stats(x2.shape[1])
            per_expert[e].update(x2)
            return


def _expert_index(full: Tensor, w: Tensor) -> int | None:
    """e such that ``w`` is the view ``full[e]`` of a (E, out, in) tensor, else None."""
    if full.dim() != 3 or tuple(w.shape) != tuple(full.shape[1:]) or full.device.type == "meta":
        return None
    if w.untyped_storage().data_ptr() != full.untyped_storage().data_ptr():
        return None
    if tuple(w.stride()) != tuple(full.stride()[1:]):
        return None
    offset = w.storage_offset() - full.storage_offset()
    if offset % full.stride(0):
        return None
    e = offset // full.stride(0)
    return e if 0 <= e < full.shape[0] else None


class eager_experts:
    """Run fused MoE experts with the per-expert loop while calibrating (``observe`` needs it)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved = None

    def __enter__(self) -> None:
        if hasattr(self.model, "get_experts_implementation") and hasattr(self.model, "set_experts_implementation"):
            try:
                self.saved = self.model.get_experts_implementation()
                self.model.set_experts_implementation("eager")
            except (ValueError, AttributeError):
                self.saved = None

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            self.model.set_experts_implementation(self.saved)


class ObservedAll(Exception):
    """Raised inside a block's forward once every watched layer has seen its input (``stop_early``)."""


@contextmanager
def stop_early(targets: list[tuple[str, nn.Module, str, str]]) -> Iterator[Callable[[], None]]:
    """Cut a statistics forward short once every target layer has received its input.

    Yields ``next_forward``: call it after each forward. The block's output is not needed while gathering statistics, so whatever runs after the last
    watched layer's input exists (that layer's own product, e.g. ``down_proj``: a quarter of a
    Llama block's multiply-adds, and the residual add) is skipped: a forward pre-hook raises
    ``ObservedAll``, which the caller catches. Enter it inside ``observe`` (its hooks must
    run first). The first forward always runs whole and shows which layers run: cutting is
    enabled only when it called every target module exactly once and no fused-expert tensor
    is watched (whose calls, like a routed expert's, vary with the data).
    """
    modules = [module for _key, module, _param, kind in targets if kind == "linear"]
    if len(modules) != len(targets) or not modules:
        yield lambda: None
        return
    first: dict[int, int] = {}  # id(module) -> calls in the first forward
    now: set[int] = set()  # modules called in the current forward
    state = {"forward": 0}

    def hook(module: nn.Module, args: tuple) -> None:
        if state["forward"] == 0:
            first[id(module)] = first.get(id(module), 0) + 1
            return
        now.add(id(module))
        if len(now) == len(modules) and all(n == 1 for n in first.values()) and len(first) == len(modules):
            raise ObservedAll

    def next_forward() -> None:
        state["forward"] += 1
        now.clear()

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        yield next_forward
    finally:
        for h in handles:
            h.remove()
