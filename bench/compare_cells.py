"""The matrix of the side-by-side benchmark: which tool runs which configuration, and its lowbit pair.

Every tool is compared at group size 64, which SmolLM2's 576-wide layers allow for every tool;
group 128 cells are kept where a tool offers them, and a refusal is a recorded result. Each
peer cell names the lowbit cell it is measured against (``pair``): the same bits, group and kind
of method (data-free against data-free, calibrated against calibrated), the closest grid lowbit
has to the peer's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

#: the tools with a runner in bench/peers/<tool>_quant.py; lowbit and fp32 run in lowbit's environment
TOOLS = ("lowbit", "llmcompressor", "hqq", "quanto", "torchao", "brevitas", "autoround")
TOOL_NAMES = {"fp32": "fp32 (reference)", "lowbit": "lowbit", "llmcompressor": "llm-compressor", "hqq": "HQQ",
              "quanto": "optimum-quanto", "torchao": "torchao", "brevitas": "brevitas", "autoround": "auto-round"}


@dataclass(frozen=True)
class Cell:
    """One run: ``tool``'s runner with ``args``, shown as ``method`` in the ``bits``-bit table."""

    tool: str
    method: str
    bits: int
    args: tuple[str, ...]
    calibrated: bool = False
    pair: str | None = None  #: key of the lowbit cell this one is compared with
    note: str = field(default="", compare=False)

    @property
    def key(self) -> str:
        return f"{self.tool}:" + re.sub(r"[^a-z0-9]+", "-", self.method.lower()).strip("-")


def _lowbit(method: str, scheme: str, bits: int, gptq: bool = False) -> Cell:
    args = ("--scheme", scheme, "--method", "gptq" if gptq else "rtn")
    return Cell("lowbit", method, bits, args, calibrated=gptq)


LOWBIT = [
    _lowbit("RTN w4g64 sym", "w4g64", 4),
    _lowbit("RTN w4g64 asym", "w4g64-asym", 4),
    _lowbit("RTN w4g128 asym", "w4g128-asym", 4),
    _lowbit("RTN w4g64 float zero", "uint4_fz:g64", 4),
    _lowbit("HQQ w4g64 (data-free)", "uint4_fz:g64:hqq", 4),
    _lowbit("GPTQ w4g64 sym", "w4g64", 4, gptq=True),
    _lowbit("GPTQ w4g64 asym", "w4g64-asym", 4, gptq=True),
    _lowbit("GPTQ w4g128 asym", "w4g128-asym", 4, gptq=True),
    _lowbit("GPTQ w4g64 HQQ zero", "uint4_fz:g64:hqq", 4, gptq=True),
    _lowbit("RTN w3g64 asym", "w3g64-asym", 3),
    _lowbit("HQQ w3g64 (data-free)", "uint3_fz:g64:hqq", 3),
    _lowbit("GPTQ w3g64 asym", "w3g64-asym", 3, gptq=True),
    _lowbit("GPTQ w3g64 HQQ zero", "uint3_fz:g64:hqq", 3, gptq=True),
    _lowbit("RTN int8 per channel", "w8", 8),
    _lowbit("RTN fp8 e4m3 per channel", "fp8", 8),
]
_K = {c.method: c.key for c in LOWBIT}


def _lc(method: str, bits: int, group: int, gptq: bool, asym: bool, pair: str) -> Cell:
    args = ("--method", "gptq" if gptq else "rtn", "--bits", str(bits), "--group", str(group)) + (("--asym",) if asym else ())
    return Cell("llmcompressor", method, bits, args, calibrated=gptq, pair=_K[pair])


PEERS = [
    _lc("GPTQ W4A16 g128", 4, 128, True, False, "GPTQ w4g64 sym"),
    _lc("GPTQ W4A16 g64", 4, 64, True, False, "GPTQ w4g64 sym"),
    _lc("GPTQ w4g64 asym", 4, 64, True, True, "GPTQ w4g64 asym"),
    _lc("RTN W4A16 g128", 4, 128, False, False, "RTN w4g64 sym"),
    _lc("RTN W4A16 g64", 4, 64, False, False, "RTN w4g64 sym"),
    _lc("GPTQ w3g64 asym", 3, 64, True, True, "GPTQ w3g64 asym"),
    _lc("RTN W8A16 per channel", 8, 0, False, False, "RTN int8 per channel"),
    Cell("hqq", "4-bit g64", 4, ("--nbits", "4", "--group", "64"), pair=_K["HQQ w4g64 (data-free)"]),
    Cell("hqq", "3-bit g64", 3, ("--nbits", "3", "--group", "64"), pair=_K["HQQ w3g64 (data-free)"]),
]

CELLS = [Cell("fp32", "fp32", 0, ("--scheme", "fp32"))] + LOWBIT + PEERS
