"""Named presets and spec strings: what ``--scheme`` accepts.

A preset is a short name (``w4g128``, ``nvfp4``); int presets have an ``-asym`` variant with an
integer zero point and an ``-asym-fz`` variant with a float zero equal to the block minimum
(GGUF Q4_1 / HQQ style). A spec string spells a spec out::

    FORMAT[:GRANULARITY][:mse|:hqq|:lpP][:scale=DTYPE]

    FORMAT       a name from `lowbit formats` (int4, uint4, uint4_fz, fp8_e4m3fn, nf4, mxfp4, ...)
    GRANULARITY  tensor | channel | gN (groups of N) | bRxC (R×C tiles); default channel
    mse          search the clipping ratio per block (squared error) instead of min-max
    lpP          the same search with the error norm sum |err|^P (lp3 is a good choice at 3 bits)
    scale=DTYPE  float16 (default), bfloat16 or float32

for example ``uint4_fz:g32``, ``fp8_e4m3fn:channel``, ``int3:g128:mse``.

A *scheme string* (``parse_tensor_scheme``) adds a layer's input activations and sparsity to
the weight spec, as parts joined by ``+``::

    [WEIGHT][+a=ACT][+s=SPARSITY]

    WEIGHT    a preset or spec string as above (may be left out: a pruning-only scheme)
    ACT       FORMAT[:token|:tensor|:gN][:static][:minmax|:mse|:percentile]; default per token,
              dynamic (scales computed from each input as it arrives)
    SPARSITY  R (a fraction of zeros, 0.5 or 50%), N:M (2:4 keeps 2 of every 4 inputs), or
              channel:R (whole input channels)

for example ``int8:channel+a=int8:token``, ``s=50%`` (half the weights
zero, float otherwise), ``int4:g128+s=2:4``. Scheme presets are in ``scheme_presets()``.
"""
from __future__ import annotations

import re

from lowbit.errors import LowbitError
from lowbit.formats.registry import all_formats, get_format
from lowbit.scheme import ActSpec, SparsitySpec, TensorScheme
from lowbit.spec import Granularity, PerBlock, PerChannel, PerGroup, PerTensor, QuantSpec

_INT_PRESETS = {"w8": (8, None), "w4g128": (4, 128), "w4g64": (4, 64), "w4g32": (4, 32),
                "w3g128": (3, 128), "w3g64": (3, 64), "w2g64": (2, 64), "w2g32": (2, 32)}
_OTHER_PRESETS = {
    "fp8": "fp8_e4m3fn:channel",
    "fp8-e5m2": "fp8_e5m2:channel",
    "fp6": "fp6_e2m3:g32",
    "fp4": "fp4_e2m1:g32",
    "nf4g64": "nf4:g64",
    "nf4g32": "nf4:g32",
    "mxfp8": "mxfp8_e4m3:g32",
    "mxfp6": "mxfp6_e2m3:g32",
    "mxfp4": "mxfp4:g32",
    "mxint8": "mxint8:g32",
    "nvfp4": "nvfp4:g16",
}


def presets() -> dict[str, str]:
    """Preset name -> the spec string it stands for."""
    out = {}
    for name, (bits, group) in _INT_PRESETS.items():
        gran = f"g{group}" if group else "channel"
        out[name] = f"int{bits}:{gran}"
        out[f"{name}-asym"] = f"uint{bits}:{gran}"
        out[f"{name}-asym-fz"] = f"uint{bits}_fz:{gran}"
        out[f"{name}-ss"] = f"int{bits}_ss:{gran}"
    out.update(_OTHER_PRESETS)
    return out


def parse_scheme(scheme: str, group_size: int | None = None, scale_search: str | None = None) -> QuantSpec:
    """A preset name or spec string -> ``QuantSpec``; ``group_size`` overrides the granularity.

    A preset may take modifiers like a format does (``w4g128-asym:mse``); names are
    case-insensitive.
    """
    head, _, rest = scheme.strip().lower().partition(":")
    is_format = head in all_formats()  # "mxfp4:g32" names the format, not the preset mxfp4 plus a group
    text = (head if is_format else presets().get(head, head)) + (":" + rest if rest else "")
    parts = [p for p in text.split(":") if p]
    if not parts:
        raise LowbitError("empty scheme; give a preset such as w4g128 or a spec string such as int4:g128")
    try:
        fmt = get_format(parts[0])
    except LowbitError:
        raise LowbitError(
            f"unknown scheme {scheme!r}; use a preset (w8, w4g128, w4g32-asym-fz, fp8, fp4, nf4g64, mxfp4, "
            "nvfp4, ...: see `lowbit quantize --help`) or a spec string FORMAT[:GRANULARITY][:mse] "
            "with a format from `lowbit formats`"
        ) from None
    search, scale_dtype, grans = "minmax", "float16", []
    for p in parts[1:]:
        if p in ("mse", "hqq") or re.fullmatch(r"lp[\d.]+", p):
            search = p
        elif p.startswith("scale="):
            scale_dtype = p.removeprefix("scale=")
        else:
            grans.append(_granularity(p, scheme))
    if len(grans) > 1:
        raise LowbitError(f"scheme {scheme!r} gives {len(grans)} granularities; give one")
    gran: Granularity = grans[0] if grans else PerGroup(fmt.fixed_block) if fmt.fixed_block else PerChannel()
    if group_size is not None:
        gran = PerGroup(group_size)
    if fmt.fixed_block and gran != PerGroup(fmt.fixed_block):
        raise LowbitError(f"{fmt.name} always uses blocks of {fmt.fixed_block}; drop --group-size or use "
                          f"g{fmt.fixed_block}")
    return QuantSpec(fmt, gran, scale_dtype=scale_dtype, scale_search=scale_search or search)


def _granularity(text: str, scheme: str) -> Granularity:
    if text == "tensor":
        return PerTensor()
    if text == "channel":
        return PerChannel()
    if m := re.fullmatch(r"g(\d+)", text):
        return PerGroup(int(m.group(1)))
    if m := re.fullmatch(r"b(\d+)x(\d+)", text):
        return PerBlock(int(m.group(1)), int(m.group(2)))
    raise LowbitError(f"unknown granularity {text!r} in scheme {scheme!r}; use tensor, channel, gN or bRxC")


def describe(spec: QuantSpec) -> str:
    """The spec string of ``spec`` (inverse of ``parse_scheme`` for spec strings)."""
    g = spec.granularity
    gran = {PerTensor: lambda: "tensor", PerChannel: lambda: "channel",
            PerGroup: lambda: f"g{g.size}", PerBlock: lambda: f"b{g.rows}x{g.cols}"}[type(g)]()
    text = f"{spec.format.name}:{gran}"
    if spec.scale_search != "minmax":
        text += f":{spec.scale_search}"
    if spec.scale_dtype != "float16":
        text += f":scale={spec.scale_dtype}"
    return text


#: Presets with activation quantization: preset -> scheme string.
_SCHEME_PRESETS = {
    "w8a8": "int8_narrow:channel+a=int8_narrow:token",  # ±127 grid, as vLLM: SmoothQuant 1.013x fp32 vs 1.022x (SmolLM2)
    "w8a8-static": "int8_narrow:channel+a=int8_narrow:tensor:static",
    "fp8-dynamic": "fp8_e4m3fn:channel+a=fp8_e4m3fn:token",
    "w4a8": "int4:g128+a=int8:token",
    "w4a4": "int4:g128+a=int4:token",
    "nvfp4-a4": "nvfp4:g16+a=nvfp4:g16",
    "mxfp4-a4": "mxfp4:g32+a=mxfp4:g32",
    "mxfp8-a8": "mxfp8_e4m3:g32+a=mxfp8_e4m3:g32",
}


def scheme_presets() -> dict[str, str]:
    """Presets that quantize activations too: name -> scheme string."""
    return dict(_SCHEME_PRESETS)


def parse_tensor_scheme(text: str, group_size: int | None = None, scale_search: str | None = None) -> TensorScheme:
    """A scheme string or preset -> ``TensorScheme`` (syntax in the module docstring).

    ``group_size`` and ``scale_search`` override the weight spec's, as for ``parse_scheme``.
    """
    text = text.strip().lower()
    head, _, rest = text.partition(":")
    if head in _SCHEME_PRESETS:
        text = _SCHEME_PRESETS[head] + (":" + rest if rest else "")
    weight = act = sparsity = None
    for part in (p.strip() for p in text.split("+")):
        if part.startswith("a="):
            act = _act(part[2:], text)
        elif part.startswith("s="):
            sparsity = _sparsity(part[2:], text)
        elif part and weight is None:
            weight = parse_scheme(part, group_size, scale_search)
        else:
            raise LowbitError(f"scheme {text!r}: part {part!r} is not understood; write "
                              "[WEIGHT][+a=ACT][+s=SPARSITY], e.g. int8:channel+a=int8:token")
    return TensorScheme(weight, act, sparsity)


def _act(text: str, scheme: str) -> ActSpec:
    parts = [p for p in text.split(":") if p]
    if not parts:
        raise LowbitError(f"scheme {scheme!r}: a=... needs an activation format, e.g. a=int8:token")
    try:
        fmt = get_format(parts[0])
    except LowbitError:
        raise LowbitError(f"scheme {scheme!r}: unknown activation format {parts[0]!r}; see `lowbit formats`") from None
    gran, group, dynamic, observer = ("group", fmt.fixed_block, True, "minmax") if fmt.fixed_block \
        else ("token", None, True, "minmax")
    for p in parts[1:]:
        if p in ("token", "tensor"):
            gran, group = p, None
        elif m := re.fullmatch(r"g(\d+)", p):
            gran, group = "group", int(m.group(1))
        elif p in ("static", "dynamic"):
            dynamic = p == "dynamic"
        elif p in ("minmax", "mse", "percentile"):
            observer = p
        else:
            raise LowbitError(f"scheme {scheme!r}: activation option {p!r} unknown; use token, tensor, gN, "
                              "static, dynamic, minmax, mse or percentile")
    return ActSpec(fmt, gran, group, dynamic, observer)


def _sparsity(text: str, scheme: str) -> SparsitySpec:
    def ratio(r: str) -> float:
        try:
            return float(r[:-1]) / 100 if r.endswith("%") else float(r)
        except ValueError:
            raise LowbitError(f"scheme {scheme!r}: sparsity {text!r} is not a ratio; write 0.5, 50%, 2:4 "
                              "or channel:0.3") from None

    if m := re.fullmatch(r"(\d+):(\d+)", text):
        return SparsitySpec("nm", n=int(m.group(1)), m=int(m.group(2)))
    if text.startswith("channel:"):
        return SparsitySpec("channel", ratio(text.removeprefix("channel:")))
    return SparsitySpec("unstructured", ratio(text))


def describe_scheme(scheme: TensorScheme) -> str:
    """The scheme string of ``scheme`` (inverse of ``parse_tensor_scheme``)."""
    parts = [describe(scheme.weight)] if scheme.weight is not None else []
    if (a := scheme.input) is not None:
        gran = f"g{a.group_size}" if a.granularity == "group" else a.granularity
        text = f"a={a.format.name}:{gran}" + ("" if a.dynamic else ":static")
        parts.append(text + ("" if a.observer == "minmax" else f":{a.observer}"))
    if (s := scheme.sparsity) is not None:
        parts.append(f"s={s.n}:{s.m}" if s.kind == "nm" else f"s={'channel:' if s.kind == 'channel' else ''}{s.ratio:g}")
    return "+".join(parts)
