"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models", arXiv:2211.10438) as a modifier: per-channel smoothing of the activations that
a later stage quantizes (``--method smoothquant+rtn --scheme w8a8``).

Per block, on the calibration inputs of the quantized model so far:

1. the block runs once per batch with hooks that find, **by tensor identity**, which affine norm's
   output tensor is the very input of which targeted layer (``input_layernorm`` -> q/k/v,
   ``post_attention_layernorm`` -> gate/up in Llama and Qwen2, ``ln_1`` -> ``c_attn`` in GPT-2), and
   that record max|X_j| of those inputs over every token. No module name is assumed;
2. per norm, ``s = lowbit.algorithms.smoothquant.smoothing_scales`` with max|W_j| over the rows of
   every layer the norm feeds; the norm's weight and bias are divided by s and each layer's
   column j multiplied by s_j, so the float block computes the same function.

The layers smoothed are this stage's targets whose scheme quantizes their input (an ``+a=`` part).
A layer is left as it is, and the block's report says why, when

* its input does not come straight from a norm (``o_proj``, ``down_proj``, GPT-2's ``c_proj``:
  their inputs come from attention or the gated activation). The paper smooths the layers after
  a LayerNorm too (QKV and FC1, its fig. 6). Folding into a preceding linear instead (v_proj ->
  o_proj, up_proj -> down_proj, as AWQ does) is not done here: it is not a tensor-identity
  mapping, and under grouped-query attention v -> o needs one scale per kv-head group;
* the norm's output is also used by anything else (an untargeted layer, a router, a residual add
  as in post-norm BERT), since that use would see the divided output;
* the norm is not affine in its parameters (``(1 + w) * x`` as in Gemma): checked numerically on
  a slice of its calibration input.

Why the fold happens in ``solve_block`` and not in ``prepare``: the paper folds the scales offline
"into the preceding norm", but the scales need each block's calibration activations, which the
data-free ``prepare`` hook does not have. Per block, only one block's statistics are ever held
(bounded memory, as for GPTQ), and the folded norms are float changes the checkpoint records with
the block (``changes_float``), so an interrupted run resumes to the same bytes.

The modifier writes no part of the scheme (``produces`` is empty): a later stage quantizes the
weight and the engine attaches the scheme's input spec to it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lowbit.algorithms.smoothquant import column_absmax, smoothing_scales
from lowbit.errors import LowbitError
from lowbit.models.targets import targets
from lowbit.modifiers.base import BlockData, Modifier
from lowbit.nn.reference import qtensors
from lowbit.qtensor import from_matrix, matrix_view


@dataclass(frozen=True)
class SmoothQuant(Modifier):
    """SmoothQuant smoothing; ``alpha`` is the migration strength (the paper's default 0.5)."""

    alpha: float = 0.5

    name = "smoothquant"
    needs_data = True
    changes_float = True
    produces = frozenset()
    requires = frozenset({"weight", "input"})

    def __post_init__(self) -> None:
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1:
            raise LowbitError(f"smoothquant alpha {a!r} must be a number from 0 to 1 (the paper uses 0.5; "
                              "larger moves more of the activations' range into the weights)")

    def solve_block(self, block: nn.Module, data: BlockData) -> dict[str, Any] | None:
        layers = _layers(block, data)
        if not layers:
            return None
        trace = _Trace(block, layers)
        with torch.no_grad(), trace:
            for j, call in enumerate(data.calls):
                call.run(block, data.q_in[j])
                trace.outputs.clear()
        with torch.no_grad():
            return self._fold(trace, layers)

    def _fold(self, trace: "_Trace", layers: dict[str, tuple[nn.Module, str]]) -> dict[str, Any]:
        smoothed: dict[str, list[str]] = {}
        left: dict[str, str] = {}
        span: list[float] = []
        for g in trace.groups.values():
            if not g.layers:
                continue
            why = g.refusal(trace.sources, layers)
            if why is None:
                s = smoothing_scales(g.act_absmax, column_absmax([_matrix(*layers[n]) for n in g.layers]), self.alpha)
                why = _fold_norm(g, s)
            if why is not None:
                left.update({n: why for n in g.layers})
                continue
            for n in g.layers:
                _scale_columns(*layers[n], s)
            smoothed[g.name] = list(g.layers)
            span += [float(s.min()), float(s.max())]
        for n in layers:
            if not any(n in ls for ls in smoothed.values()) and n not in left:
                left[n] = ("not called on the calibration data" if not trace.sources.get(n)
                           else "its input does not come straight from a norm")
        info: dict[str, Any] = {"smoothed": smoothed, "left": left}
        if span:
            info["scale_min"], info["scale_max"] = min(span), max(span)
        return info


def _layers(block: nn.Module, data: BlockData) -> dict[str, tuple[nn.Module, str]]:
    """name in block -> (module, layout) of the stage's linear layers whose input is quantized."""
    names = {id(m): n for n, m in block.named_modules()}
    layouts = {t.module_name: t.layout for t in targets(block) if t.kind == "linear"}
    out = {}
    for key, module, param, scheme in data.layers:
        if param in qtensors(module):
            raise LowbitError(f"smoothquant changes float weights, but {key} is already quantized by an earlier "
                              "stage; put smoothquant before the stage that quantizes it (e.g. smoothquant+rtn)")
        name = names.get(id(module))
        if scheme.input is not None and name in layouts and param == "weight":
            out[name] = (module, layouts[name])
    return out


def _matrix(module: nn.Module, layout: str) -> Tensor:
    return matrix_view(module.weight.detach().to(torch.float32), layout)  # (rows, cols)


def _scale_columns(module: nn.Module, layout: str, s: Tensor) -> None:
    """W[:, j] *= s_j on the (rows, cols) view, written back in the weight's own layout and dtype."""
    w = module.weight
    w.copy_(from_matrix(_matrix(module, layout) * s.to(w.device), tuple(w.shape), layout).to(w.dtype))


def _fold_norm(g: "_Group", s: Tensor) -> str | None:
    """Divide the norm's weight (and bias) by s; None if its output then is its old output / s."""
    norm, sample = g.norm, g.sample
    params = [p for p in (norm.weight, getattr(norm, "bias", None)) if isinstance(p, nn.Parameter)]
    before = [p.detach().clone() for p in params]
    y0 = norm(sample).to(torch.float32)
    for p in params:
        p.copy_((p.to(torch.float32) / s.to(p.device)).to(p.dtype))
    y1 = norm(sample).to(torch.float32) * s.to(y0.device)
    tol = max(1e-4, 16 * torch.finfo(norm.weight.dtype).eps) * float(y0.abs().max()) + 1e-12
    if bool(((y1 - y0).abs() > tol).any()):
        for p, b in zip(params, before):
            p.copy_(b)
        return f"{type(norm).__name__} {g.name} is not affine in its weight (output not proportional to it)"
    return None


@dataclass
class _Group:
    """One affine norm and the targeted layers that read its output tensor."""

    name: str
    norm: nn.Module
    layers: list[str] = field(default_factory=list)
    act_absmax: Tensor | None = None  # (cols,) float32 max|X_j| over every token seen
    sample: Tensor | None = None  # the norm's input in the first call, first item of dim 0
    other_use: str | None = None  # an operation outside the layers that also read the output

    def refusal(self, sources: dict[str, set], layers: dict) -> str | None:
        if self.other_use is not None:
            return f"the output of {self.name} is also used by {self.other_use}"
        for n in self.layers:
            if sources[n] != {id(self.norm)}:
                return f"{n} does not read the output of {self.name} in every call"
            if _matrix(*layers[n]).shape[1] != self.norm.weight.numel():
                return f"{n} has {_matrix(*layers[n]).shape[1]} inputs, {self.name} {self.norm.weight.numel()} channels"
        return None


def _is_norm(m: nn.Module) -> bool:
    """A module with a 1-D weight (and optionally a bias of the same size): a candidate affine norm."""
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    return (isinstance(w, nn.Parameter) and w.dim() == 1
            and (b is None or (isinstance(b, nn.Parameter) and b.shape == w.shape)))


class _Trace(TorchFunctionMode):
    """Hooks and a torch-function mode that map norm outputs to the layers reading them.

    Inside the watched layers (``depth`` > 0) and inside its own hooks, operations are not
    inspected; outside, any operation that takes a norm's output and returns a new tensor marks
    that norm's output as used elsewhere.
    """

    def __init__(self, block: nn.Module, layers: dict[str, tuple[nn.Module, str]]) -> None:
        super().__init__()
        self.block, self.layers = block, layers
        self.groups: dict[int, _Group] = {}
        self.outputs: dict[int, list] = {}  # id(norm output) -> [output, id(norm), accumulated]; per call
        self.sources: dict[str, set] = {n: set() for n in layers}  # layer -> {id(norm) or None} over calls
        self.depth = 0
        self.handles: list = []

    def __enter__(self):
        watched = {id(m) for m, _ in self.layers.values()}
        for name, m in self.block.named_modules():
            if m is not self.block and id(m) not in watched and _is_norm(m):
                self.groups[id(m)] = _Group(name, m)
                self.handles.append(m.register_forward_hook(self._norm_hook))
        for name, (m, _) in self.layers.items():
            self.handles.append(m.register_forward_pre_hook(self._enter_layer(name)))
            self.handles.append(m.register_forward_hook(self._leave_layer))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for h in self.handles:
            h.remove()
        self.outputs.clear()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0 and self.outputs and _has_tensor(out):
            for a in (*args, *kwargs.values()):
                for t in (a if isinstance(a, (list, tuple)) else (a,)):
                    hit = self.outputs.get(id(t)) if isinstance(t, Tensor) else None
                    if hit is not None and hit[0] is t and out is not t:
                        g = self.groups[hit[1]]
                        g.other_use = g.other_use or getattr(func, "__name__", str(func))
        return out

    def _norm_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not isinstance(output, Tensor):
            return
        self.depth += 1
        self.outputs[id(output)] = [output, id(module), False]
        g = self.groups[id(module)]
        if g.sample is None and args and isinstance(args[0], Tensor):
            g.sample = args[0][:1].detach().clone()
        self.depth -= 1

    def _enter_layer(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self.depth += 1
            x = args[0] if args else None
            hit = self.outputs.get(id(x)) if isinstance(x, Tensor) else None
            if hit is None or hit[0] is not x:
                self.sources[name].add(None)
                return
            self.sources[name].add(hit[1])
            g = self.groups[hit[1]]
            if name not in g.layers:
                g.layers.append(name)
            if not hit[2]:  # once per norm output, however many layers read it
                m = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).to(torch.float32)  # (cols,)
                g.act_absmax = m if g.act_absmax is None else torch.maximum(g.act_absmax, m)
                hit[2] = True
        return hook

    def _leave_layer(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.depth -= 1


def _has_tensor(out: Any) -> bool:
    return isinstance(out, Tensor) or (isinstance(out, (list, tuple)) and any(isinstance(o, Tensor) for o in out))
