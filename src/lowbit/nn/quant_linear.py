"""``QuantLinear``: a Linear layer whose weight stays packed in memory.

It picks the fastest kernel that represents the weight exactly, in this order:

* ``int8``    symmetric int8 per row or per tensor, ``aten._weight_int8pack_mm``
  (``lowbit.nn.kernel_int8``);
* ``int4``    integer formats of 2 to 4 bits in groups of a multiple of 32, per row or per
  tensor, ``aten._weight_int4pack_mm_for_cpu`` (``lowbit.nn.kernel_int4``);
* ``dequant`` anything else: dequantize-then-matmul by row chunks (``lowbit.nn.kernel_dequant``).

The two CPU kernels compute in bf16; the dequant path in float32 equals the fake-quant model.
Both int kernels need torch with those ops (2.6 or newer; without them the dequant path runs)
and CPU tensors: their packed layouts are CPU layouts, so a packed int8/int4 layer refuses other
devices with a clear error (load with ``packed=False`` to run elsewhere). The dequant path runs
on any device.

Extra roles of the weight (``lowbit.qtensor``):

* ``input``/``input_scale``: the input is fake-quantized first (``lowbit.nn.activation``), as on
  the reference path;
* ``lowrank_a``/``lowrank_b``: a float32 side path adds ``(x @ Bᵀ) @ Aᵀ`` (with int8 factors,
  ``((x @ Bᵀ) · lowrank_scale) @ Aᵀ``);
* ``mask``: free on the int kernels when every masked code is the format's exact zero (symmetric
  integer formats round a pruned zero to it); otherwise the layer takes the dequant path, which
  applies the mask.

``QuantLinear`` serves ``nn.Linear`` (weight ``(out, in)``) and GPT-2's ``Conv1D`` (weight
``(in, out)``): both compute ``x @ M.T + b`` with the matrix view ``M`` (out, in).
``qtensor()`` rebuilds the ``QuantizedTensor`` (bit-exact) for saving and export.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import lowbit.nn.kernel_dequant as kernel_dequant
import lowbit.nn.kernel_int4 as kernel_int4
import lowbit.nn.kernel_int8 as kernel_int8
from lowbit.errors import LowbitError
from lowbit.formats.int import IntFormat
from lowbit.nn.activation import quantize_input
from lowbit.packing import pack
from lowbit.qtensor import QuantizedTensor, matrix_view

KERNELS = (kernel_int8, kernel_int4, kernel_dequant)
_BY_NAME = {k.NAME: k for k in KERNELS}


def choose_kernel(qt: QuantizedTensor, allow: tuple[str, ...] = ("int8", "int4", "dequant")):
    """The first kernel module of ``KERNELS`` named in ``allow`` that runs ``qt``."""
    if qt.mask is not None and not mask_is_free(qt):
        return kernel_dequant
    for k in KERNELS:
        if k.NAME in allow and k.supports(qt) is None and _available(k.NAME):
            return k
    return kernel_dequant


def mask_is_free(qt: QuantizedTensor) -> bool:
    """True when every weight the mask drops is already stored as the format's exact zero code."""
    fmt = qt.spec.format
    if not (isinstance(fmt, IntFormat) and fmt.symmetric):
        return False
    dropped = ~matrix_view(qt.mask, qt.layout)  # (rows, cols) bool
    return bool((qt.codes()[dropped] == 2 ** (fmt.bits - 1)).all())


def _available(name: str) -> bool:
    ops = {"int8": "_weight_int8pack_mm", "int4": "_weight_int4pack_mm_for_cpu", "dequant": None}[name]
    return ops is None or hasattr(torch.ops.aten, ops)


class QuantLinear(nn.Module):
    """``y = x @ Ŵᵀ + b`` with ``Ŵ`` held packed.

    qt:    the QuantizedTensor of the weight (layout "rows" for Linear, "transposed" for Conv1D).
    bias:  (out,) or None.
    dtype: the compute dtype the model runs in; outputs come back in the input's dtype.
    """

    def __init__(self, qt: QuantizedTensor, bias: Tensor | None = None, dtype: torch.dtype = torch.float32,
                 kernels: tuple[str, ...] = ("int8", "int4", "dequant")) -> None:
        super().__init__()
        if len(qt.shape) != 2 or qt.layout not in ("rows", "transposed"):
            raise LowbitError(f"QuantLinear needs a 2-D weight in layout rows or transposed, not {qt.shape} {qt.layout}")
        self.out_features, self.in_features = qt.matrix_shape
        self.shape, self.layout, self.dtype = qt.shape, qt.layout, dtype
        # codes are held dense here, so the metadata drops ``kept`` (the stored count of a sparse tensor's codes)
        self._meta = {k: v for k, v in qt.meta().items() if k != "kept"}
        self.spec, self.input = qt.spec, qt.input
        self.kernel_name = choose_kernel(qt, kernels).NAME  # a name, so the layer deep-copies and pickles
        tensors = {"codes": qt.packed} if self.kernel is kernel_dequant else self.kernel.pack(qt)
        for name, t in tensors.items():
            self.register_buffer(f"k_{name}", t, persistent=False)
        # scales and zeros in their stored encodings (fp16 scales, packed integer zeros): qtensor() decodes them
        for role, t in qt.to_tensors().items():
            if role != "codes":
                self.register_buffer(f"s_{role}", t, persistent=False)
        if qt.lowrank_scale is not None:  # int8 factors' per-component scales (metadata, not a stored role)
            self.register_buffer("lowrank_scale", qt.lowrank_scale.to(torch.float32), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self._names = tuple(tensors)

    @property
    def kernel(self):
        return _BY_NAME[self.kernel_name]

    def _tensors(self) -> dict[str, Tensor]:
        return {n: self._buffers["k_" + n] for n in self._names}

    def _apply(self, fn, recurse: bool = True):
        """``.to(device)`` moves every buffer; ``.to(dtype)``/``.half()`` change only the compute dtype
        and the bias: packed codes, kernel scales and stored scales keep their own dtypes."""
        probe = fn(torch.zeros(1, dtype=self.dtype))
        buffers, self._buffers = self._buffers, {}
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers = {n: None if b is None else b.to(probe.device) for n, b in buffers.items()}
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return self

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.input is not None:
            scale = self._buffers.get("s_input_scale")
            x2 = quantize_input(x2, self.input, None if scale is None else scale.reshape(()))
        if self.kernel is not kernel_dequant and x.device.type != "cpu":
            raise LowbitError(f"this layer's packed {self.kernel.NAME} weights use PyTorch's CPU kernels and cannot "
                              f"run on {x.device}; load the model with lowbit.load(path, packed=False) for that device")
        if self.kernel is kernel_int4:
            y = kernel_int4.matmul(x2, self._tensors(), self.out_features)
        elif self.kernel is kernel_int8:
            y = kernel_int8.matmul(x2, self._tensors())
        else:
            y = kernel_dequant.matmul(x2, self.qtensor())
        if "s_lowrank_a" in self._buffers:  # (M, K) @ (K, r) @ (r, N) in float32
            a, b = self.s_lowrank_a.to(torch.float32), self.s_lowrank_b.to(torch.float32)
            t = x2.to(torch.float32) @ b.t()  # (M, r)
            if "lowrank_scale" in self._buffers:
                t = t * self.lowrank_scale
            y = y.to(torch.float32) + t @ a.t()
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def qtensor(self) -> QuantizedTensor:
        """The weight's QuantizedTensor, code for code (rebuilt from the kernel layout if needed)."""
        if self.kernel is kernel_dequant:
            packed = self.k_codes
        elif self.kernel is kernel_int4:
            fmt = self.spec.format
            packed = pack(kernel_int4.codes(self._tensors(), self.in_features, self.out_features, fmt).reshape(-1),
                          fmt.bits)
        else:
            packed = pack(kernel_int8.codes(self._tensors(), self.in_features).reshape(-1), 8)
        stored = {n[2:]: b for n, b in self._buffers.items() if n.startswith("s_") and b is not None}
        return QuantizedTensor.from_tensors(self._meta, {"codes": packed, **stored}, self.spec)

    def nbytes(self) -> int:
        """Bytes this layer holds in memory (kernel layout, scales, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers()) + (
            0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"spec={self.spec.format.name}, kernel={self.kernel.NAME}, bias={self.bias is not None}")
