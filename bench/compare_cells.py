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
    group: str = ""  #: the report's table for this cell (default: its bit width)

    @property
    def table(self) -> str:
        return self.group or f"{self.bits}-bit"

    @property
    def key(self) -> str:
        return f"{self.tool}:" + re.sub(r"[^a-z0-9]+", "-", self.method.lower()).strip("-")


def _lowbit(method: str, scheme: str, bits: int, gptq: bool = False, note: str = "", solver: str = "",
            extra: tuple[str, ...] = ()) -> Cell:
    solver = solver or ("gptq" if gptq else "rtn")
    return Cell("lowbit", method, bits, ("--scheme", scheme, "--method", solver) + extra, calibrated=solver != "rtn",
                note=note)


LOWBIT = [
    _lowbit("RTN w4g64 sym", "w4g64", 4,
            note="every lowbit row: decode runs the model lowbit.load returns, with packed QuantLinear layers "
                 "(PyTorch's int4/int8 CPU kernels, bf16 compute) where the format allows and the dequantized "
                 "reference elsewhere; bench/decode.py measures decode speed properly"),
    _lowbit("RTN w4g64 asym", "w4g64-asym", 4),
    _lowbit("RTN w4g128 asym", "w4g128-asym", 4),
    _lowbit("RTN w4g64 float zero", "uint4_fz:g64", 4),
    _lowbit("HQQ w4g64 (data-free)", "uint4_fz:g64:hqq", 4),
    _lowbit("GPTQ w4g64 sym", "w4g64", 4, gptq=True),
    _lowbit("GPTQ w4g64 asym", "w4g64-asym", 4, gptq=True),
    _lowbit("GPTQ w4g128 asym", "w4g128-asym", 4, gptq=True),
    _lowbit("GPTQ w4g64 HQQ zero", "uint4_fz:g64:hqq", 4, gptq=True),
    _lowbit("SignRound w4g64 sym", "w4g64", 4, solver="signround",
            note="lowbit's SignRound with its defaults: 50 signed-gradient steps per block of 2 windows each"),
    _lowbit("SignRound w4g64 sym, fp32 training", "w4g64", 4, solver="signround", extra=("--set", "compute=fp32"),
            note="the training passes in float32 (SignRound's compute before bf16 became its default)"),
    _lowbit("SignRound w4g64 sym, auto-round's light settings", "w4g64", 4, solver="signround",
            extra=("--set", "lr=0.005", "--batch", "8"),
            note="lowbit's SignRound set as auto-round's light recipe: 50 steps of 8 windows, lr 5e-3"),
    _lowbit("SignRound w4g64 sym, 100 steps", "w4g64", 4, solver="signround", extra=("--set", "steps=100")),
    _lowbit("SignRound w2g64 asym", "w2g64-asym", 2, solver="signround"),
    _lowbit("RTN w4g64 signed scale", "w4g64-ss", 4,
            note="int4_ss: each group's largest-magnitude weight sits exactly on code -8 whatever its sign "
                 "(GGUF Q4_0's rule, and auto-round's symmetric grid)"),
    _lowbit("GPTQ w4g64 signed scale", "w4g64-ss", 4, gptq=True),
    _lowbit("SignRound w4g64 signed scale", "w4g64-ss", 4, solver="signround",
            note="lowbit's SignRound with its defaults on auto-round's symmetric grid"),
    _lowbit("SignRound w4g64 signed scale, 1 window per step", "w4g64-ss", 4, solver="signround", extra=("--batch", "1")),
    _lowbit("SignRound w4g64 signed scale, 30 steps", "w4g64-ss", 4, solver="signround", extra=("--set", "steps=30")),
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
    Cell("hqq", "3-bit g64", 3, ("--nbits", "3", "--group", "64"), pair=_K["HQQ w3g64 (data-free)"],
         note="the hqq package rounds the zero point only at 4 bits; lowbit's HQQ starts from a rounded zero at "
              "every width, hence the 3-bit gap (see the GPTQ section above)"),
    # optimum-quanto: min-max asymmetric int4 with a float shift (lowbit's uint4_fz), per-row int8
    Cell("quanto", "qint4 (its own groups: 96 or 128)", 4, ("--bits", "4"), pair=_K["RTN w4g64 float zero"],
         note="quanto picks the group itself: 128, or the largest of 96/64/32 dividing the inputs"),
    Cell("quanto", "qint4 g64", 4, ("--bits", "4", "--group", "64"), pair=_K["RTN w4g64 float zero"]),
    Cell("quanto", "qint8 per channel", 8, ("--bits", "8"), pair=_K["RTN int8 per channel"]),
    # torchao: the CPU int4 layout (tinygemm grid: float zero) in bfloat16, int8 weight-only per row
    Cell("torchao", "int4 weight-only g64 (bf16)", 4, ("--bits", "4", "--group", "64"), pair=_K["RTN w4g64 float zero"],
         note="torchao's CPU int4 kernel is built for bfloat16 (float32 activations are ~60x slower), so this model "
              "runs in bfloat16, lm_head included"),
    Cell("torchao", "int4 weight-only g128 (bf16)", 4, ("--bits", "4", "--group", "128"), pair=_K["RTN w4g64 float zero"]),
    Cell("torchao", "int8 weight-only per row", 8, ("--bits", "8"), pair=_K["RTN int8 per channel"]),
    # brevitas: its LLM example's weight-only quantizers, GPTQ block by block
    Cell("brevitas", "RTN int4 g64 sym", 4, ("--format", "int", "--bits", "4", "--group", "64", "--method", "rtn"),
         pair=_K["RTN w4g64 sym"], note="brevitas is fake-quant (float weights and quantizer parameters): nothing compact "
                                        "is saved, so no size; bits/weight counts float32 scales"),
    Cell("brevitas", "GPTQ int4 g64 sym", 4, ("--format", "int", "--bits", "4", "--group", "64", "--method", "gptq"),
         calibrated=True, pair=_K["GPTQ w4g64 sym"],
         note="brevitas's GPTQ re-quantizes the whole weight for every column once groups are used (its column-"
              "slicing shortcut is for per-channel scales only), which is most of its time; its LLM example's "
              "block loop hard-codes CUDA, so bench/peers/brevitas_quant.py runs the same loop on the CPU"),
    Cell("brevitas", "GPTQ int3 g64 asym", 3,
         ("--format", "int", "--bits", "3", "--group", "64", "--asym", "--method", "gptq"),
         calibrated=True, pair=_K["GPTQ w3g64 asym"]),
    Cell("brevitas", "fp8 e4m3 per channel", 8, ("--format", "fp8", "--group", "0", "--method", "rtn"),
         pair=_K["RTN fp8 e4m3 per channel"]),
    # auto-round: SignRound, its "light" recipe (50 steps, lr 5e-3): the default 200 steps would take ~110 min
    Cell("autoround", "SignRound light W2 g64 asym", 2,
         ("--bits", "2", "--group", "64", "--iters", "50", "--lr", "5e-3", "--asym"),
         calibrated=True, pair=_K["SignRound w2g64 asym"], note="auto-round's light recipe at 2 bits"),
    Cell("autoround", "SignRound light W4 g64 sym", 4, ("--bits", "4", "--group", "64", "--iters", "50", "--lr", "5e-3"),
         calibrated=True, pair=_K["SignRound w4g64 signed scale"],
         note="auto-round's light recipe (50 SignRound steps per block, lr 5e-3, no torch.compile): its default "
              "200 steps measured ~1.1 s each per block here, ~110 min per configuration; reloaded through its "
              "CPU backend, which runs in float16"),
    # g128 through auto-round's iters-0 mode (its optimized RTN, no SignRound): a 576-wide layer has no
    # whole 128 groups, and this cheap cell shows what auto-round makes of that (SignRound light would
    # cost ~28 min more for the same save-and-reload path)
    Cell("autoround", "opt-RTN (iters 0) W4 g128 sym", 4, ("--bits", "4", "--group", "128", "--iters", "0"),
         calibrated=True, pair=_K["RTN w4g64 sym"],
         note="the checkpoint saves, but reloaded with from_pretrained its 576-wide layers get auto-round's "
              "fallback module, whose forward fails (auto_round/experimental/qmodules/fake.py, the error shown)"),
]

CELLS = [Cell("fp32", "fp32", 0, ("--scheme", "fp32"))] + LOWBIT + PEERS


def _prune(tool: str, method: str, group: str, args: tuple[str, ...], calibrated: bool = True,
           pair: str | None = None, note: str = "") -> Cell:
    return Cell(tool, method, 32, args, calibrated=calibrated, pair=pair, note=note, group=group)


#: ``bench/compare.py --suite sparse``: one-shot pruning of SmolLM2's decoder Linears, float weights kept
SPARSE_LOWBIT = [
    _prune("lowbit", "magnitude 50%", "50% unstructured", ("--scheme", "s=50%", "--method", "magnitude"),
           calibrated=False, note="plain magnitude pruning, each layer's smallest half: the reference"),
    _prune("lowbit", "Wanda 50%", "50% unstructured", ("--scheme", "s=50%", "--method", "wanda")),
    _prune("lowbit", "SparseGPT 50%", "50% unstructured", ("--scheme", "s=50%", "--method", "sparsegpt")),
    _prune("lowbit", "magnitude 2:4", "2:4", ("--scheme", "s=2:4", "--method", "magnitude"), calibrated=False),
    _prune("lowbit", "Wanda 2:4", "2:4", ("--scheme", "s=2:4", "--method", "wanda")),
    _prune("lowbit", "SparseGPT 2:4", "2:4", ("--scheme", "s=2:4", "--method", "sparsegpt")),
]
_S = {c.method: c.key for c in SPARSE_LOWBIT}
SPARSE_PEERS = [
    _prune("llmcompressor", "SparseGPT 50%", "50% unstructured", ("--method", "sparsegpt", "--sparsity", "0.5"),
           pair=_S["SparseGPT 50%"]),
    _prune("llmcompressor", "Wanda 50%", "50% unstructured", ("--method", "wanda", "--sparsity", "0.5"),
           pair=_S["Wanda 50%"]),
    _prune("llmcompressor", "SparseGPT 2:4", "2:4", ("--method", "sparsegpt", "--pattern", "2:4"),
           pair=_S["SparseGPT 2:4"]),
    _prune("llmcompressor", "Wanda 2:4", "2:4", ("--method", "wanda", "--pattern", "2:4"), pair=_S["Wanda 2:4"]),
]
SPARSE_CELLS = [CELLS[0]] + SPARSE_LOWBIT + SPARSE_PEERS
