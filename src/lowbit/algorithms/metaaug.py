"""MetaAug's pure parts (Pham et al., "MetaAug: Meta-Data Augmentation for Post-Training
Quantization", ECCV 2024; shared/papers/METHODS.md §11): the transformation network T, the
one-step unrolled update, and the outer loss's terms.

The bilevel objective, per calibration batch ``x`` (θ: T's parameters, V: the block's rounding
variables)::

    inner(V, θ)  = ‖q_block(T(x); V) − fp_block(T(x))‖² + reg · Σ(1 − |2h(V) − 1|^β)
    V'(θ)        = V − lr · ∇_V inner(V, θ) / rms(∇_V inner)            (one step, by hand)
    outer(θ)     = α · D(q_block(x; V'(θ)), fp_out)                      (D: KL at T = 4, or MSE)
                 + β · ReLU(τ − ‖T(x) − x‖² / ‖x‖²)                      (T must change x)
                 + γ · PKT(fp_block(mix(T(x))), fp_block(mix(x)))        (and keep its structure)

and θ moves by Adam on ∇_θ outer, clipped to norm 0.1. The losses are float32 (float64 inputs
stay float64).

Choices of ours, where the paper (an image UNet, `higher`'s Adam) does not carry over:

* **T** is a residual two-layer MLP on the last axis (per token of (B, T, hidden) hidden states,
  per row of (B, features) inputs): ``T(x) = x + relu(x·W1ᵀ + b1)·W2ᵀ + b2`` with ``W2, b2 = 0`` at
  the start, so ``T(x) = x`` exactly. The paper's T is a UNet on images; this transfer to hidden
  states is a guess.
* **The inner step** is a gradient step scaled by a detached ``1/rms`` per tensor, so that it
  moves V by about ``lr`` per element like the first step of AdaRound's Adam. The authors unroll
  Adam itself through ``higher``; Adam's first step is ``lr·sign(g)`` up to ε, whose derivative in
  θ all but vanishes, so the KL term would hardly reach T.
* **The margin** is relative to the inputs' mean square (the paper's τ = 0.1 is absolute, on
  images normalized to about unit variance, where both agree); hidden states have any scale.
* **mixup** pairs ``T(x)`` and ``x``: the same λ and the same partner rows for both (the authors'
  code draws them separately). λ ~ Beta(4, 4), folded to ``max(λ, 1 − λ)``, as in their code.
* **PKT** (Passalis & Tefas, ECCV 2018) compares rows of the last axis (tokens or samples), at
  most ``PKT_ROWS`` of them, evenly strided, so its (N, N) similarity matrices stay small.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

PKT_ROWS = 512  # rows (tokens) compared by the PKT term at most: two (N, N) float32 matrices
TEMPERATURE = 4.0  # the KL term's softmax temperature (the authors' code divides logits by 4)


def init_transform(dim: int, width: int, generator: torch.Generator) -> list[Tensor]:
    """T's parameters [W1 (width, dim), b1 (width,), W2 (dim, width), b2 (dim,)], float32.

    W1 and b1 are uniform in ±1/√dim (``nn.Linear``'s range); W2 and b2 are zero, so T starts at
    the identity exactly.
    """
    bound = dim ** -0.5
    W1 = (torch.rand((width, dim), generator=generator) * 2 - 1) * bound
    b1 = (torch.rand((width,), generator=generator) * 2 - 1) * bound
    return [W1, b1, torch.zeros(dim, width), torch.zeros(dim)]


def transform(x: Tensor, theta: list[Tensor]) -> Tensor:
    """T(x) = x + relu(x·W1ᵀ + b1)·W2ᵀ + b2 on the last axis of ``x`` (..., dim); computed in
    the parameters' dtype (float32 from ``init_transform``) and returned in ``x``'s dtype."""
    W1, b1, W2, b2 = theta
    h = x.to(W1.dtype)
    return (h + F.linear(F.relu(F.linear(h, W1, b1)), W2, b2)).to(x.dtype)


def unrolled_step(inner: Tensor, V: list[Tensor], lr: float) -> tuple[list[Tensor], list[Tensor]]:
    """One differentiable step from ``V`` on the () loss ``inner``: (V', ∇_V inner).

    ``V' = V − lr · g / rms(g)`` per tensor, ``rms`` detached (module docstring); ``g`` keeps its
    graph (``create_graph``), so V' is differentiable in whatever ``inner`` depended on.
    """
    grads = torch.autograd.grad(inner, V, create_graph=True)
    return [v - lr * g / _rms(g) for v, g in zip(V, grads)], list(grads)


def _wide(t: Tensor) -> Tensor:
    """``t`` in float32, or float64 if it is float64 already (the tests' finite differences)."""
    return t if t.dtype == torch.float64 else t.float()


def _rms(g: Tensor) -> Tensor:
    return g.detach().pow(2).mean().sqrt().clamp(min=1e-12)


def meta_gradient(inner: Callable[[list[Tensor]], Tensor], outer: Callable[[list[Tensor]], Tensor],
                  V: list[Tensor], theta: list[Tensor], lr: float) -> tuple[list[Tensor], Tensor]:
    """(∇_θ outer(V'(θ)), outer's value): the hypergradient of one unrolled step.

    ``inner(V)`` and ``outer(V')`` are () losses built from tensors that depend on ``theta``
    (each requiring grad); ``V`` are leaves requiring grad.
    """
    updated, _ = unrolled_step(inner(V), V, lr)
    loss = outer(updated)
    return list(torch.autograd.grad(loss, theta, allow_unused=True)), loss.detach()


def relative_change(augmented: Tensor, x: Tensor) -> Tensor:
    """mean((T(x) − x)²) / mean(x²), the denominator detached: () float32."""
    x = _wide(x)
    return (_wide(augmented) - x).pow(2).mean() / x.pow(2).mean().detach().clamp(min=1e-12)


def margin_penalty(augmented: Tensor, x: Tensor, tau: float) -> Tensor:
    """ReLU(τ − relative_change(T(x), x)): () float32, zero once T moves x far enough.

    At T's identity start its gradient is zero too (the change is quadratic in T's offset): the
    other terms move T off the identity first, then the margin pushes on.
    """
    return F.relu(tau - relative_change(augmented, x))


def kl_distance(out: Tensor, target: Tensor, temperature: float = TEMPERATURE) -> Tensor:
    """KL(softmax(target/t) ‖ softmax(out/t)) over the last axis, mean over rows: () float32."""
    log_q = F.log_softmax(_wide(out).reshape(-1, out.shape[-1]) / temperature, dim=-1)
    log_p = F.log_softmax(_wide(target).reshape(-1, target.shape[-1]) / temperature, dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def mixup_draw(n: int, generator: torch.Generator) -> tuple[float, Tensor]:
    """(λ, partner rows (n,) int64): λ ~ Beta(4, 4) folded to [1/2, 1], a seeded permutation."""
    lam = float(torch.rand(7, generator=generator, dtype=torch.float64).sort().values[3])  # Beta(4, 4):
    # the 4th smallest of 7 uniforms
    return max(lam, 1.0 - lam), torch.randperm(n, generator=generator)


def mixup(x: Tensor, lam: float, partner: Tensor) -> Tensor:
    """λ·x + (1 − λ)·x[partner] along the first axis; shapes of ``x``."""
    return lam * x + (1.0 - lam) * x[partner]


def pkt(student: Tensor, teacher: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer: KL between the rows' cosine-similarity distributions.

    student, teacher: (..., d) features, compared as rows of their last axis (at most
    ``PKT_ROWS``, evenly strided). Each row's cosine similarities to every row, mapped to [0, 1]
    by (c + 1)/2 and normalized to sum 1, give a distribution; the result is the mean over all
    (i, j) of p_t·log(p_t / p_s), a () float32 tensor.
    """
    def distribution(f: Tensor) -> Tensor:
        f = _wide(f).reshape(-1, f.shape[-1])
        f = f[:: max(1, -(-f.shape[0] // PKT_ROWS))]  # (N, d), N <= PKT_ROWS
        f = f / (f.norm(dim=1, keepdim=True) + eps)
        s = (f @ f.T + 1.0) / 2.0  # (N, N) in [0, 1]
        return s / s.sum(dim=1, keepdim=True)

    p_s, p_t = distribution(student), distribution(teacher)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()
