"""LoRC, the low-rank compensation of ZeroQuant-V2 (Yao, Wu, Li, Youn, He, "ZeroQuant-V2: Exploring
Post-training Quantization in LLMs from Comprehensive Study to Low Rank Compensation",
arXiv:2303.08302): a rank-r correction of a layer's quantization error.

Given the error ``E = W − Ŵ`` (rows, cols) of a quantized weight and its SVD ``E = U Σ Vᵀ``:

    A = U_r Σ_r^{1/2}    (rows, r)        B = Σ_r^{1/2} V_rᵀ    (r, cols)

and the layer serves ``Ŵ + A B``. By Eckart–Young, ``‖E − A B‖_F = sqrt(Σ_{i>r} σ_i²)``, the least
any rank-r correction can leave, and it cannot grow with r.

Factor storage (``FACTOR_DTYPES``), and its cost in bits per weight of a (rows, cols) matrix:

==========  ==============================================  ==========================
dtype       stored                                          bits
==========  ==============================================  ==========================
float16     A, B in fp16 (the default)                      16·r·(rows+cols)
bfloat16    A, B in bf16                                    16·r·(rows+cols)
float32     A, B as computed                                32·r·(rows+cols)
int8        A, B as int8 codes, symmetric round-to-nearest  8·r·(rows+cols) + 32·r
            with one scale per rank component: column k of
            A has scale a_k = max|A[:,k]|/127, row k of B
            has b_k = max|B[k,:]|/127; the r products
            ``s_k = a_k·b_k`` (float32) are kept, so
            ``A B ≈ A_q diag(s) B_q``
==========  ==============================================  ==========================

The paper quantizes the factors to 8 bits [unverified: the text we have says "probably"]; the
per-component scale is our choice (the square-root split gives A's column k and B's row k the same
norm ``sqrt(σ_k)``, so one scale per component fits both). The SVD runs in float32 on E's device;
each component's sign is fixed so that the largest-magnitude entry of ``U[:, k]`` is positive, so
the same E gives the same bytes whatever sign the LAPACK build picks.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lowbit.errors import LowbitError

FACTOR_DTYPES = ("float16", "bfloat16", "float32", "int8")


def check_rank(rank: int, rows: int, cols: int, name: str = "this weight") -> None:
    """Raise unless 0 < rank < min(rows, cols) (a full-rank correction would store more than W)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank < min(rows, cols):
        raise LowbitError(f"lorc rank {rank!r} does not fit {name} ({rows}x{cols}); use an integer from 1 to "
                          f"{min(rows, cols) - 1} (a small one such as 8)")


def check_factor_dtype(dtype: str) -> None:
    if dtype not in FACTOR_DTYPES:
        raise LowbitError(f"lorc factor dtype {dtype!r} is not supported; use one of {', '.join(FACTOR_DTYPES)}")


def lowrank_factors(E: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """E (rows, cols) float -> A (rows, r), B (r, cols) float32 with ``A B`` the best rank-r
    approximation of E (truncated SVD, ``A = U_r Σ_r^{1/2}``, ``B = Σ_r^{1/2} V_rᵀ``)."""
    rows, cols = E.shape
    check_rank(rank, rows, cols)
    U, S, Vh = torch.linalg.svd(E.to(torch.float32), full_matrices=False)  # (rows, k), (k,), (k, cols)
    U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    pick = U.abs().argmax(dim=0)  # (r,) row of each component's largest entry
    sign = torch.sign(U.gather(0, pick[None]).squeeze(0))  # (r,)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    root = S.sqrt() * sign  # (r,)
    return U * root, (S.sqrt()[:, None] * sign[:, None]) * Vh


def store_factors(A: Tensor, B: Tensor, dtype: str = "float16") -> tuple[Tensor, Tensor, Tensor | None]:
    """float32 A (rows, r), B (r, cols) -> (a, b, scale) in the storage ``dtype`` (module table).

    scale: (r,) float32 products of the per-component scales for ``int8``, else None;
    ``a.float() @ diag(scale) @ b.float()`` (or ``a.float() @ b.float()``) reconstructs A B.
    """
    check_factor_dtype(dtype)
    if dtype != "int8":
        dt = getattr(torch, dtype)
        return A.to(dt), B.to(dt), None
    sa = A.abs().amax(dim=0) / 127  # (r,)
    sb = B.abs().amax(dim=1) / 127  # (r,)
    sa = torch.where(sa > 0, sa, torch.ones_like(sa))
    sb = torch.where(sb > 0, sb, torch.ones_like(sb))
    a = torch.round(A / sa).clamp(-127, 127).to(torch.int8)  # (rows, r)
    b = torch.round(B / sb[:, None]).clamp(-127, 127).to(torch.int8)  # (r, cols)
    return a, b, (sa * sb).to(torch.float32)


def lorc(E: Tensor, rank: int, dtype: str = "float16") -> tuple[Tensor, Tensor, Tensor | None]:
    """E (rows, cols) float32 -> the stored factors ``(a, b, scale)`` of its rank-r compensation."""
    A, B = lowrank_factors(E, rank)
    return store_factors(A, B, dtype)

