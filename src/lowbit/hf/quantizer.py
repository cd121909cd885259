"""Hugging Face integration: ``from_pretrained`` on a lowbit folder returns the quantized model.

A folder saved by ``lowbit.save`` carries ``quantization_config`` in ``config.json``
(``quant_method: "lowbit"``, the spec of every quantized tensor, see ``quantization_config``).
transformers dispatches that method through its public registry
(``transformers.quantizers.auto.register_quantization_config`` / ``register_quantizer``),
which ``lowbit`` fills the moment transformers' quantizer registry is imported (``install_hook``),
so ``import lowbit`` alone stays free of transformers.

Loading runs in transformers' own loader, on the meta device:

1. before the weights load, each quantized weight is replaced by a ``StoredWeight`` child
   module named ``weight`` whose buffers (``codes``, ``scale``, ``zero``, ``global_scale``)
   have exactly the saved tensors' names, shapes and dtypes, so the loader fills them from
   ``<key>.weight.codes`` and so on as it fills any buffer;
2. after loading, each one becomes a packed ``lowbit.nn.QuantLinear`` (or, for a weight that is
   not a Linear's, the reference dequantized weight, ``lowbit.apply.attach``).
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar
from importlib.abc import Loader, MetaPathFinder
from typing import Any, Iterator

import torch
from torch import nn

QUANT_METHOD = "lowbit"
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


def quantization_config(manifest: dict[str, Any]) -> dict[str, Any]:
    """The ``quantization_config`` entry of a saved config.json, from a lowbit manifest."""
    from lowbit.schemes import describe
    from lowbit.spec import QuantSpec

    specs: dict[str, int] = {}
    for meta in manifest["quantized"].values():
        if "spec" in meta:
            name = describe(QuantSpec.from_dict(meta["spec"]))
            specs[name] = specs.get(name, 0) + 1
    return {"quant_method": QUANT_METHOD, "format_version": manifest["format_version"],
            "lowbit_version": manifest["lowbit_version"],
            "scheme": ", ".join(f"{k} ({n} tensors)" for k, n in sorted(specs.items())),
            "quantized": manifest["quantized"]}


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

    def qtensor(self):
        from lowbit.qtensor import QuantizedTensor

        tensors = {r: b for r, b in self.named_buffers(recurse=False)}
        return QuantizedTensor.from_tensors(self.meta, tensors)


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
    out = {"codes": ((packed_nbytes(prod(shape), fmt.bits),), torch.uint8), "scale": (grid, scale_dtype)}
    if fmt.zero_kind == "int":
        out["zero"] = ((packed_nbytes(prod(grid), fmt.bits),), torch.uint8)
    elif fmt.zero_kind == "float":
        out["zero"] = (grid, SCALE_DTYPES[spec.scale_dtype])
    if type(fmt).global_scale is not Format.global_scale:  # a two-level format (NVFP4)
        out["global_scale"] = ((1,), torch.float32)
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
                     scheme: str = "", **kwargs: Any) -> None:
            self.quant_method = QUANT_METHOD
            self.quantized = quantized or {}
            self.format_version = format_version
            self.lowbit_version = lowbit_version
            self.scheme = scheme

        def to_dict(self) -> dict[str, Any]:
            return {"quant_method": QUANT_METHOD, "format_version": self.format_version,
                    "lowbit_version": self.lowbit_version, "scheme": self.scheme, "quantized": self.quantized}

    @auto.register_quantizer(QUANT_METHOD)
    class LowbitHfQuantizer(HfQuantizer):
        """Loads lowbit folders (pre-quantized only; quantize with ``lowbit quantize``)."""

        requires_calibration = True

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            from lowbit.errors import LowbitError
            from lowbit.io import FORMAT_VERSION

            version = self.quantization_config.format_version
            if version != FORMAT_VERSION:
                raise LowbitError(f"this folder has lowbit format version {version}; this lowbit reads {FORMAT_VERSION}")
            device_map = kwargs.get("device_map")
            if isinstance(device_map, dict) and "disk" in device_map.values():
                raise LowbitError("lowbit models cannot be offloaded to disk; load them on one device")

        def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
            return dtype

        def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
            from lowbit.errors import LowbitError

            quantized = self.quantization_config.quantized
            tied = sorted(k for k, m in quantized.items() if "same_as" in m)
            if tied:
                raise LowbitError(f"this folder quantizes a tied weight ({tied[0]} = {quantized[tied[0]]['same_as']}), "
                                  "which transformers cannot re-tie; load it with lowbit.load(path)")
            modules = dict(model.named_modules())
            for key, meta in quantized.items():
                module_name, _, param = key.rpartition(".")
                module = modules.get(module_name)
                if module is None:
                    raise LowbitError(f"the checkpoint quantizes {key}, which {type(model).__name__} does not have")
                module._parameters.pop(param, None)
                module.add_module(param, StoredWeight(meta))

        def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
            _finish_loading(model, self.quantization_config.quantized, packed=_PACKED.get())
            return model

        def is_serializable(self) -> bool:
            return False  # save with lowbit.save, which writes lowbit's own layout

        @property
        def is_trainable(self) -> bool:
            return False


def _finish_loading(model: nn.Module, quantized: dict[str, Any], packed: bool = True) -> None:
    """Turn every ``StoredWeight`` into a packed QuantLinear or an attached reference weight.

    Tied quantized weights never get here (``_process_model_before_weight_loading`` refuses them).
    """
    from lowbit.nn.convert import place

    for key, meta in quantized.items():
        module_name, _, param = key.rpartition(".")
        module = model.get_submodule(module_name)
        qt = module._modules.pop(param).qtensor()  # the placeholder goes as soon as it is read
        place(model, module_name, param, qt, getattr(torch, meta["dtype"]), packed)


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
