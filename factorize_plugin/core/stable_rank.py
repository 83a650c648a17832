"""Stable rank ``||W||_F^2 / ||W||_2^2`` of a weight matrix, estimated by power iteration.

The stable rank is a smooth, scale-free stand-in for the rank: 1 for a rank-one matrix, n for a
multiple of an orthogonal n x n matrix. Cuttlefish (Wang et al., MLSys 2023) watches it during
training: once it stops changing, the layer's spectrum has settled and the layer can go low-rank.

The largest singular value comes from ``iterations`` steps of power iteration on the smaller Gram
matrix (``W^T W`` or ``W W^T``), each two matrix-vector products, started from a fixed
pseudo-random vector: the estimate is a deterministic function of W (same weights, same value, on
every process and after a resume), costs about ``2 * iterations * D * M`` multiply-adds, never an
SVD. It never overestimates ``||W||_2``, so the estimate is never below the true stable rank; its
error shrinks as ``(sigma_2 / sigma_1)^(4 * iterations)``. A narrow layer (min(D, M) <= 2 *
iterations) gets the exact value from its small Gram matrix instead, at no more cost.
"""

from __future__ import annotations

import torch

_SEED = 0x5EED


def spectral_norm_sq(w: torch.Tensor, iterations: int = 20) -> float:
    """An estimate of ``sigma_max(W)^2`` for W [D, M] (any float dtype; computed in float32 at
    least): by ``iterations`` >= 1 steps of power iteration from a fixed start vector, or exactly
    (the largest eigenvalue of the k x k Gram matrix, k = min(D, M)) where k <= 2 * iterations, for
    which that costs no more multiply-adds."""
    if w.ndim != 2:
        raise ValueError(f"expected a matrix [D, M], got a tensor of shape {tuple(w.shape)}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    dtype = torch.promote_types(w.dtype, torch.float32)
    w = w.detach().to(dtype)
    if w.shape[0] < w.shape[1]:  # iterate in the smaller space
        w = w.T
    if w.shape[1] <= 2 * iterations:
        return float(torch.linalg.eigvalsh(w.T @ w)[-1])
    g = torch.Generator(device="cpu").manual_seed(_SEED)
    v = torch.randn(w.shape[1], generator=g, dtype=dtype).to(w.device)
    for _ in range(iterations):  # no host sync inside the loop: a few kernel launches per step
        v = w.T @ (w @ v)  # [M]
        v = v / v.norm().clamp_min(torch.finfo(dtype).tiny)
    u = w @ v  # ||W v||^2 with ||v|| = 1: a lower bound of sigma_max^2
    return float(u.dot(u))


def stable_rank(w: torch.Tensor, iterations: int = 20) -> float:
    """``||W||_F^2 / ||W||_2^2`` of W [D, M], the spectral norm by power iteration (see the
    module's docstring); 0.0 for an all-zero W."""
    frob = float(w.detach().to(torch.promote_types(w.dtype, torch.float32)).square().sum())
    if frob == 0.0:
        return 0.0
    return frob / max(spectral_norm_sq(w, iterations), frob / min(w.shape))  # sigma_max^2 >= ||W||_F^2 / min(D, M)


__all__ = ["spectral_norm_sq", "stable_rank"]
