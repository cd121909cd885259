"""Hugging Face integration: ``from_pretrained`` on a lowbit folder returns the quantized model.

A folder saved by ``lowbit.save`` carries ``quantization_config`` in ``config.json``
(``quant_method: "lowbit"``, the spec of every quantized tensor, see ``lowbit.manifest``).
transformers dispatches that method through its public registry
(``transformers.quantizers.auto.register_quantization_config`` / ``register_quantizer``),
which ``lowbit`` fills the moment transformers' quantizer registry is imported (``install_hook``),
so ``import lowbit`` alone stays free of transformers.

Loading runs in transformers' own loader, on the meta device:

1. before the weights load, each quantized weight is replaced by a ``StoredWeight`` child
   module named ``weight`` whose buffers (one per stored role: ``codes``, ``scale``, ``zero``,
   ``global_scale``, ``mask``, ``lowrank_a``, ...) have exactly the saved tensors' names, shapes
   and dtypes, so the loader fills them from ``<key>.weight.codes`` and so on as it fills any
   buffer; a float weight pruned in place gets a ``weight_mask`` buffer for its packed mask;
2. after loading, each one becomes a packed ``lowbit.nn.QuantLinear`` (or, for a weight that is
   not a Linear's, the reference dequantized weight, ``lowbit.nn.reference.attach``), with its
   input quantization; masks move to ``lowbit.nn.reference.attach_mask``.

Folders of an older format are migrated (``lowbit.manifest.migrate``); a newer one is refused.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar
from importlib.abc import Loader, MetaPathFinder
from typing import Any, Iterator

import torch
from torch import nn

from lowbit.manifest import QUANT_METHOD, migrate
_HOOKED = "transformers.quantizers.auto"
_PACKED: ContextVar[bool] = ContextVar("lowbit_packed", default=True)


@contextmanager
def loading(packed: bool = True) -> Iterator[None]:
    """Within this block, from_pretrained builds packed layers (``packed=True``) or the float
    fake-quant reference (``packed=False``); see ``lowbit.io.load_into``."""
    token = _PACKED.set(packed)
    try:
        yield
    finally:
        _PACKED.reset(token)


class StoredWeight(nn.Module):
    """Placeholder for one quantized weight while transformers loads the checkpoint.

    Buffers mirror ``QuantizedTensor.to_tensors()``: ``codes`` (nbytes,) uint8, ``scale`` (grid)
    in its storage dtype, optional ``zero`` and ``global_scale``.
    """

    def __init__(self, meta: dict[str, Any]) -> None:
        super().__init__()
        self.meta = meta
        for role, (shape, dtype) in _stored_shapes(meta).items():
            self.register_buffer(role, torch.empty(shape, dtype=dtype, device="meta"))

    def qtensor(self, name: str = "this tensor"):
        from lowbit.qtensor import QuantizedTensor

        tensors = {r: b for r, b in self.named_buffers(recurse=False)}
        return QuantizedTensor.from_tensors(self.meta, tensors, name=name)


def _stored_shapes(meta: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    from math import prod

    from lowbit.formats.base import Format
    from lowbit.grouping import grid_shape
    from lowbit.packing import packed_nbytes
    from lowbit.qtensor import matrix_shape, scale_storage
    from lowbit.spec import SCALE_DTYPES, QuantSpec, tile_of

    spec = QuantSpec.from_dict(meta["spec"])
    shape = tuple(meta["shape"])
    fmt = spec.format
    rows, cols = matrix_shape(shape, meta["layout"])
    grid = grid_shape((rows, cols), tile_of(spec.granularity, rows, cols))
    storage = scale_storage(spec)
    scale_dtype = {"e8m0": torch.uint8, "float8_e4m3fn": torch.float8_e4m3fn}.get(storage) or SCALE_DTYPES[storage]
    stored = meta.get("kept", prod(shape))  # a sparse tensor stores its kept weights' codes only
    out = {"codes": ((packed_nbytes(stored, fmt.bits),), torch.uint8), "scale": (grid, scale_dtype)}
    if fmt.zero_kind == "int":
        out["zero"] = ((packed_nbytes(prod(grid), fmt.bits),), torch.uint8)
    elif fmt.zero_kind == "float":
        out["zero"] = (grid, SCALE_DTYPES[spec.scale_dtype])
    if type(fmt).global_scale is not Format.global_scale:  # a two-level format (NVFP4)
        out["global_scale"] = ((1,), torch.float32)
    roles = meta.get("roles", ())
    if "mask" in roles:
        out["mask"] = ((packed_nbytes(prod(shape), 1),), torch.uint8)
    if "lowrank_a" in roles:
        r, dtype = meta["lowrank"]["rank"], getattr(torch, meta["lowrank"]["dtype"])
        out["lowrank_a"], out["lowrank_b"] = ((rows, r), dtype), ((r, cols), dtype)
    if "input_scale" in roles:
        out["input_scale"] = ((1,), torch.float32)
    return out


def _register(auto: Any) -> None:
    """Register lowbit's config and quantizer classes in transformers' registry (idempotent)."""
    if QUANT_METHOD in auto.AUTO_QUANTIZER_MAPPING:
        return
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    @auto.register_quantization_config(QUANT_METHOD)
    class LowbitConfig(QuantizationConfigMixin):
        """transformers-side view of a lowbit folder's ``quantization_config``."""

        def __init__(self, quantized: dict | None = None, format_version: int = 1, lowbit_version: str = "",
                     scheme: str = "", masks: dict | None = None, added_biases: list | None = None,
                     **kwargs: Any) -> None:
            self.quant_method = QUANT_METHOD
            self.quantized = quantized or {}
            self.masks = masks or {}
            self.added_biases = added_biases or []
            self.format_version = format_version
            self.lowbit_version = lowbit_version
            self.scheme = scheme

        def to_dict(self) -> dict[str, Any]:
            out = {"quant_method": QUANT_METHOD, "format_version": self.format_version,
                   "lowbit_version": self.lowbit_version, "scheme": self.scheme, "quantized": self.quantized,
                   "masks": self.masks}
            if self.added_biases:
                out["added_biases"] = self.added_biases
            return out

        def current(self) -> dict[str, Any]:
            """This config at the current folder format (``lowbit.manifest.migrate``)."""
            return migrate(self.to_dict(), "this folder's config.json")

    @auto.register_quantizer(QUANT_METHOD)
    class LowbitHfQuantizer(HfQuantizer):
        """Loads lowbit folders (pre-quantized only; quantize with ``lowbit quantize``)."""

        requires_calibration = True

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            from lowbit.errors import LowbitError

            self.quantization_config.current()  # refuses a newer folder format, naming the version needed
            device_map = kwargs.get("device_map")
            if isinstance(device_map, dict) and "disk" in device_map.values():
                raise LowbitError("lowbit models cannot be offloaded to disk; load them on one device")

        def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
            return dtype

        def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
            from lowbit.errors import LowbitError
            from lowbit.nn.reference import add_bias

            qc = self.quantization_config.current()
            quantized = qc["quantized"]
            tied = sorted(k for k, m in quantized.items() if "same_as" in m)
            if tied:
                raise LowbitError(f"this folder quantizes a tied weight ({tied[0]} = {quantized[tied[0]]['same_as']}), "
                                  "which transformers cannot re-tie; load it with lowbit.load(path)")
            modules = dict(model.named_modules())
            for key in qc.get("added_biases", []):  # biases bias correction added: the checkpoint fills them
                module_name = key.rpartition(".")[0]
                if module_name not in modules:
                    raise LowbitError(f"the checkpoint adds the bias {key}, which {type(model).__name__} does not have")
                add_bias(modules[module_name], device=torch.device("meta"))  # in the float weight's dtype
            for key, meta in quantized.items():
                module_name, _, param = key.rpartition(".")
                module = modules.get(module_name)
                if module is None:
                    raise LowbitError(f"the checkpoint quantizes {key}, which {type(model).__name__} does not have")
                module._parameters.pop(param, None)
                module.add_module(param, StoredWeight(meta))
            for key, meta in qc["masks"].items():
                module_name, _, param = meta["tensor"].rpartition(".")
                n = packed_mask_bytes(meta["shape"])
                modules[module_name].register_buffer(param, torch.empty(n, dtype=torch.uint8, device="meta"))

        def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
            _finish_loading(model, self.quantization_config.current(), packed=_PACKED.get())
            return model

        def is_serializable(self) -> bool:
            return False  # save with lowbit.save, which writes lowbit's own layout

        @property
        def is_trainable(self) -> bool:
            return False


def packed_mask_bytes(shape: list[int]) -> int:
    from math import prod

    from lowbit.packing import packed_nbytes

    return packed_nbytes(prod(shape), 1)


def _finish_loading(model: nn.Module, qc: dict[str, Any], packed: bool = True) -> None:
    """Turn every ``StoredWeight`` into a packed QuantLinear or an attached reference weight, and
    every float mask buffer into a recorded mask.

    Tied quantized weights never get here (``_process_model_before_weight_loading`` refuses them).
    """
    from lowbit.nn.convert import place
    from lowbit.nn.reference import attach_mask
    from lowbit.qtensor import unpack_mask

    for key, meta in qc["quantized"].items():
        module_name, _, param = key.rpartition(".")
        module = model.get_submodule(module_name)
        qt = module._modules.pop(param).qtensor(key)  # the placeholder goes as soon as it is read
        place(model, module_name, param, qt, getattr(torch, meta["dtype"]), packed)
    for key, meta in qc["masks"].items():
        module_name, _, bname = meta["tensor"].rpartition(".")
        stored = model.get_submodule(module_name)._buffers.pop(bname)
        attach_mask(model.get_submodule(key.rpartition(".")[0]), key.rpartition(".")[2],
                    unpack_mask(stored, tuple(meta["shape"])))


class _RegisterWhenImported(MetaPathFinder, Loader):
    """Runs ``_register`` right after ``transformers.quantizers.auto`` is first imported."""

    _lowbit_hook = True  # marks every instance, also of a reloaded copy of this class

    def find_spec(self, name: str, path: Any, target: Any = None):
        if name != _HOOKED:
            return None
        for finder in sys.meta_path:
            if getattr(finder, "_lowbit_hook", False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                self._inner = spec.loader
                spec.loader = self
                return spec
        return None

    def create_module(self, spec: Any):
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "_lowbit_hook", False)]
        _register_safely(module)


def _register_safely(auto: Any) -> None:
    """Register, but never let a transformers API change break transformers itself."""
    try:
        _register(auto)
    except Exception as e:  # noqa: BLE001 - any failure here must only cost lowbit's own integration
        import warnings

        warnings.warn(f"lowbit could not register with transformers ({type(e).__name__}: {e}); "
                      "from_pretrained will not load lowbit folders, lowbit.load still does", stacklevel=2)


def install_hook() -> None:
    """Register now if transformers' quantizer registry is loaded, else as soon as it is."""
    auto = sys.modules.get(_HOOKED)
    if auto is not None:
        _register_safely(auto)
    elif not any(getattr(f, "_lowbit_hook", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWhenImported())
