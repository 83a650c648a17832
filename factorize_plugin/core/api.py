"""``factorize_matrix`` and ``factorize_conv2d``: the documented core API, as thin wrappers over
the streaming statistics (``MomentAccumulator``) and the exact solver (``decompose``)."""

from __future__ import annotations

from typing import Optional

import torch

from .conv import ConvGeometry, conv_weight_to_matrix, iter_conv_patches, matrix_to_conv_weight
from .solver import LowRankSolution, RankLike, decompose, nmse_of, resolve_rank
from .statistics import MomentAccumulator


def _check_n_iters(n_iters: int) -> None:
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 0:
        raise ValueError(f"n_iters must be a non-negative int, got {n_iters!r}")


def _solve(
    stats: MomentAccumulator,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    rank: int,
    current_rank: Optional[int],
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor, int, float]:
    """Shared core of both wrappers, on matrices in float64: returns (Wa, Wb, bias, rank, nmse),
    with Wb None and rank -1 when no factorization is made (see ``factorize_matrix``)."""
    d, m = weight.shape
    if current_rank is not None and rank >= current_rank:
        return None, None, bias, -1, nmse_of(stats, weight, bias, weight, bias)
    dec = decompose(stats, weight, bias)
    if rank >= min(d, m):
        dense, dense_bias = dec.dense()
        return dense, None, dense_bias, -1, float(dec.nmse_curve[-1])
    wa, wb, new_bias = dec.factors(rank)
    return wa, wb, new_bias, rank, float(dec.nmse_curve[rank])


def factorize_matrix(
    X: torch.Tensor,
    Y: torch.Tensor,
    Wa: torch.Tensor,
    Wb: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    rank: RankLike = 0.25,
    n_iters: int = 3,
) -> LowRankSolution:
    """Best rank-``rank`` approximation of a linear map on the given data.

    Returns ``Wa`` [D, rank], ``Wb`` [rank, M] and ``bias`` [M] minimizing, jointly and exactly,
    ``|| Y - (X @ Wa @ Wb + bias) ||_F^2`` (closed form, see ``factorize_plugin.core.solver``).

    Args:
        X: inputs [..., D] (any leading shape: [N, D], [B, T, D], ...), any floating dtype.
        Y: targets [..., M] with X's leading shape, normally ``X @ W + bias`` of the original layer.
        Wa: the current operator: W [D, M], or the first factor [D, d] of an already-factorized
            pair (progressive case).
        Wb: the second factor [d, M] of the current pair, or None.
        bias: the current bias [M] (the new bias is fitted jointly, so it does not change the
            optimum; it is kept in the "no change" case below).
        rank: int >= 1, or a float in (0, 1) meaning that fraction of min(D, M).
        n_iters: kept for compatibility with Composer's signature. The solution is exact in closed
            form, so it is not used (it must be a non-negative int).

    Returns:
        A ``LowRankSolution`` in ``Wa``'s dtype and device, whose ``nmse`` is
        sum (Y - Y_hat)^2 / sum (Y - mean Y)^2 (per-feature means over the samples).
        When factorizing cannot shrink the layer, no factorization is made and ``rank`` is -1:
        for a pair (``Wb`` given) and ``rank >= d``, the pair is returned unchanged;
        otherwise, for ``rank >= min(D, M)``, ``Wa`` is the best dense [D, M] map and ``Wb`` is None.

    Raises:
        ValueError: mismatched shapes, empty ``X``, a bad rank, NaN/inf in ``X`` or ``Y``.
    """
    _check_n_iters(n_iters)
    if X.ndim < 2 or Y.ndim < 2:
        raise ValueError(f"X and Y must have at least 2 dimensions ([N, D], [N, M]); got {tuple(X.shape)}, {tuple(Y.shape)}")
    if X.shape[:-1] != Y.shape[:-1]:
        raise ValueError(f"X {tuple(X.shape)} and Y {tuple(Y.shape)} must share their leading (sample) dimensions")
    if X.numel() == 0:
        raise ValueError("X is empty: at least one sample is needed")
    d, m = X.shape[-1], Y.shape[-1]
    if Wa.ndim != 2 or Wa.shape[0] != d:
        raise ValueError(f"Wa must be [D={d}, ...], got {tuple(Wa.shape)}")
    if Wb is None:
        if Wa.shape[1] != m:
            raise ValueError(f"Wa must be [D={d}, M={m}] when Wb is None, got {tuple(Wa.shape)}")
        weight, current = Wa, None
    else:
        if Wb.ndim != 2 or Wb.shape != (Wa.shape[1], m):
            raise ValueError(f"Wb must be [{Wa.shape[1]}, M={m}] to follow Wa {tuple(Wa.shape)}, got {tuple(Wb.shape)}")
        weight, current = Wa.detach().double() @ Wb.detach().double(), Wa.shape[1]
    if bias is not None and bias.shape != (m,):
        raise ValueError(f"bias must have shape [{m}], got {tuple(bias.shape)}")
    k = resolve_rank(rank, d, m)

    stats = MomentAccumulator(d, m, device=X.device).update(X, Y)
    stats.check("X and Y")
    wa, wb, new_bias, k, nmse = _solve(stats, weight, bias, k, current)
    if wa is None:  # unchanged pair
        return LowRankSolution(Wa=Wa, Wb=Wb, bias=bias, rank=-1, nmse=nmse)
    like = dict(dtype=Wa.dtype, device=Wa.device)
    return LowRankSolution(
        Wa=wa.to(**like), Wb=None if wb is None else wb.to(**like), bias=new_bias.to(**like), rank=k, nmse=nmse
    )


def factorize_conv2d(
    X: torch.Tensor,
    Wa: torch.Tensor,
    Wb: Optional[torch.Tensor] = None,
    rank: RankLike = 0.25,
    biasA: Optional[torch.Tensor] = None,
    biasB: Optional[torch.Tensor] = None,
    n_iters: int = 3,
    **conv2d_kwargs,
) -> LowRankSolution:
    """Best factorization of a k_h x k_w convolution into a k_h x k_w convolution into ``rank``
    channels followed by a 1 x 1 convolution, on the given inputs.

    Minimizes exactly ``|| (W * X + bias) - (Wb' * (Wa' * X) + new_bias) ||_F^2`` over the outputs
    the convolution really produces (with its stride, padding, padding mode and dilation).

    Args:
        X: inputs [N, C_in, H, W].
        Wa: W [C_out, C_in, k_h, k_w], or the first factor [d, C_in, k_h, k_w] of a pair.
        Wb: the second factor [C_out, d, 1, 1] of a pair, or None.
        rank: int >= 1, or a float in (0, 1) meaning that fraction of min(C_in, C_out).
        biasA: the bias of W ([C_out]) or, for a pair, of the first factor ([d]).
        biasB: the bias of the second factor ([C_out]); only with ``Wb``.
        n_iters: kept for compatibility; unused (the solution is exact).
        **conv2d_kwargs: ``stride``, ``padding`` (int, pair, 'same', 'valid'), ``dilation``,
            ``padding_mode`` ('zeros', 'reflect', 'replicate', 'circular'), ``groups`` (must be 1).

    Returns:
        ``LowRankSolution`` with ``Wa`` [rank, C_in, k_h, k_w], ``Wb`` [C_out, rank, 1, 1],
        ``bias`` [C_out], in ``Wa``'s dtype and device. The no-change cases are those of
        ``factorize_matrix`` (with D = C_in * k_h * k_w, M = C_out); the dense case returns
        ``Wa`` [C_out, C_in, k_h, k_w] and ``Wb`` None.

    Raises:
        RuntimeError: ``biasB`` is given but ``Wb`` is not.
        NotImplementedError: ``groups != 1``.
        ValueError: mismatched shapes, empty ``X``, a bad rank, NaN/inf in ``X``.
    """
    if biasB is not None and Wb is None:
        raise RuntimeError("biasB was given but Wb is None: biasB is the bias of the second factor Wb")
    _check_n_iters(n_iters)
    if Wa.ndim != 4:
        raise ValueError(f"Wa must be a 4-D conv weight, got shape {tuple(Wa.shape)}")
    geometry = ConvGeometry.from_kwargs(tuple(Wa.shape[2:]), **conv2d_kwargs)
    if X.ndim != 4 or X.shape[1] != Wa.shape[1]:
        raise ValueError(f"X must be [N, C_in={Wa.shape[1]}, H, W], got {tuple(X.shape)}")
    if X.numel() == 0:
        raise ValueError("X is empty: at least one sample is needed")
    c_in = Wa.shape[1]
    w_mat = conv_weight_to_matrix(Wa.detach()).double()  # [D, C_out or d]
    b = None if biasA is None else biasA.detach().double()
    current = None
    if Wb is not None:
        if Wb.ndim != 4 or Wb.shape[1] != Wa.shape[0] or Wb.shape[2:] != (1, 1):
            raise ValueError(f"Wb must be [C_out, {Wa.shape[0]}, 1, 1], got {tuple(Wb.shape)}")
        wb_mat = conv_weight_to_matrix(Wb.detach()).double()  # [d, C_out]
        current = Wa.shape[0]
        b = (b @ wb_mat if b is not None else 0) + (biasB.detach().double() if biasB is not None else 0)
        b = b if isinstance(b, torch.Tensor) else None
        w_mat = w_mat @ wb_mat
    d, m = w_mat.shape
    if b is not None and b.shape != (m,):
        raise ValueError(f"the bias must have length {m}, got {tuple(b.shape)}")
    k = resolve_rank(rank, c_in, m)

    stats = MomentAccumulator(d, device=X.device)
    for patches in iter_conv_patches(X.detach(), geometry):
        stats.update(patches)
    stats.check("X")
    wa, wb, new_bias, k, nmse = _solve(stats, w_mat, b, k, current)
    if wa is None:
        return LowRankSolution(Wa=Wa, Wb=Wb, bias=biasB, rank=-1, nmse=nmse)
    like = dict(dtype=Wa.dtype, device=Wa.device)
    wa_conv = matrix_to_conv_weight(wa, c_in, geometry.kernel_size).to(**like)
    wb_conv = None if wb is None else matrix_to_conv_weight(wb, k, (1, 1)).to(**like)
    return LowRankSolution(Wa=wa_conv, Wb=wb_conv, bias=new_bias.to(**like), rank=k, nmse=nmse)
