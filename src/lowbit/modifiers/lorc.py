"""LoRC (ZeroQuant-V2, arXiv:2303.08302) as a modifier: a rank-r correction of the quantization
error of every weight an earlier stage quantized (``--method rtn+lorc``, ``gptq+lorc``,
``hqq+lorc``, or a recipe stage after a quantizing one).

How it gets the float weight: LoRC needs ``E = W − Ŵ``, and once a stage has quantized a tensor
the model holds only ``Ŵ``. The modifier declares ``refines``; planning then refuses any tensor it
targets that no earlier stage quantizes, and the engine has the quantizing stage keep the float
matrix view W beside the attached ``QuantizedTensor`` (``lowbit.nn.reference.keep_float``) until
this stage takes it (``refine_layer``). In a calibrated run (``gptq+lorc``) both stages run on a
block before the next, so at most one block's float weights wait; in a data-free run
(``rtn+lorc``) every targeted float weight waits until the LoRC stage, so that run holds up to
twice the targeted weights.

``Ŵ`` is the quantized tensor's dequantization (its mask applied, no earlier low-rank term); the
factors are ``lowbit.algorithms.lorc``'s, in the ``dtype`` storage (float16, bfloat16, float32 or
int8 with per-component scales), and their bits count in ``bits_per_weight``. For fused experts
the correction is of the (E·out, in) matrix view: one B shared by the experts [our choice].
The default rank 8 is the paper's small-rank setting [unverified].

Data-free: it needs no calibration data. The corrected layer serves ``x Ŵᵀ + (x Bᵀ) Aᵀ``; a
later stage cannot quantize the tensor again.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor, nn

from lowbit.algorithms.lorc import check_factor_dtype, check_rank, lorc
from lowbit.errors import LowbitError
from lowbit.modifiers.base import BlockWork, Modifier
from lowbit.qtensor import QuantizedTensor, matrix_shape, matrix_view
from lowbit.scheme import TensorScheme


@dataclass(frozen=True)
class LoRC(Modifier):
    """Low-rank compensation: ``rank`` components of the error, factors stored as ``dtype``."""

    rank: int = 8
    dtype: str = "float16"

    name = "lorc"
    produces = frozenset()  # it writes no part of the scheme; it corrects what a quantizer wrote
    refines = True

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise LowbitError(f"lorc rank must be a positive integer (such as 8), got {self.rank!r}")
        check_factor_dtype(self.dtype)

    def allocate(self, model: nn.Module, pairs: list, batches: list | None = None, progress: bool = True) -> list:
        """Refuse, at planning, a rank that does not fit a targeted tensor (shapes only; no weight read)."""
        for target, _ in pairs:
            w = model.get_submodule(target.module_name).get_parameter(target.param) \
                if target.module_name else model.get_parameter(target.param)
            check_rank(self.rank, *matrix_shape(tuple(w.shape), target.layout), name=target.key)
        return pairs

    def refine_layer(self, W: Tensor, qt: QuantizedTensor, scheme: TensorScheme, key: str) -> QuantizedTensor:
        """W (rows, cols) float32, its quantized tensor -> ``qt`` with rank-``rank`` factors of W − Ŵ."""
        if qt.rank:
            raise LowbitError(f"{key} already has rank-{qt.rank} low-rank factors; run lorc once per tensor")
        check_rank(self.rank, *W.shape, name=key)
        plain = replace(qt, lowrank_a=None, lowrank_b=None, lowrank_scale=None)
        E = W - matrix_view(plain.dequantize(), qt.layout).to(W.device)  # (rows, cols)
        a, b, scale = lorc(E, self.rank, self.dtype)
        return replace(qt, lowrank_a=a.cpu(), lowrank_b=b.cpu(), lowrank_scale=None if scale is None else scale.cpu())

    def memory(self, work: BlockWork) -> int:
        """The SVD of the largest layer: E, U and Vᵀ and workspace, about four (rows, cols) float32."""
        return max((16 * r * c for r, c in work.layers), default=0)

    def flops(self, work: BlockWork) -> float:
        """A thin SVD per layer, about 14·rows·cols·min(rows, cols)."""
        return float(sum(14 * r * c * min(r, c) for r, c in work.layers))

