"""``factorize_matrix`` and ``factorize_conv2d``: the documented core API, as thin wrappers over
the streaming statistics (``MomentAccumulator``) and the exact solver (``decompose``)."""

from __future__ import annotations

import numbers
from typing import Any, Literal, Optional, cast, overload

import torch

from .conv import ConvGeometry, conv_weight_to_matrix, iter_conv_patches, matrix_to_conv_weight
from .solver import LowRankSolution, RankLike, _as_rank_number, _check_finite, decompose, nmse_of
from .statistics import MomentAccumulator


def _check_n_iters(n_iters: int) -> None:
    if isinstance(n_iters, bool) or not isinstance(n_iters, numbers.Integral) or n_iters < 0:
        raise ValueError(f"n_iters must be a non-negative int, got {n_iters!r}")


def _require_tensor(value: object, name: str, expected: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor ({expected}), got {type(value).__name__}")
    return value


@overload
def _check_weight(value: object, name: str, expected: str, optional: Literal[False] = False) -> torch.Tensor: ...


@overload
def _check_weight(value: object, name: str, expected: str, optional: bool) -> Optional[torch.Tensor]: ...


def _check_weight(value: object, name: str, expected: str, optional: bool = False) -> Optional[torch.Tensor]:
    """A weight or bias must be a finite floating-point tensor (an integer one would give integer
    factors and a wrong NMSE): TypeError / ValueError naming it otherwise. ``optional``: None passes."""
    if optional and value is None:
        return None
    t = _require_tensor(value, name, expected)
    if not t.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor ({expected}), got dtype {t.dtype}: "
            f"convert it first, e.g. {name}.float()"
        )
    _check_finite(t, name)
    return t


def _check_data(value: object, name: str, expected: str) -> torch.Tensor:
    """Data (X, Y) may be any real dtype; integer and boolean data are taken as float64 (exact)."""
    t = _require_tensor(value, name, expected)
    if t.is_complex():
        raise TypeError(f"{name} must be a real tensor ({expected}), got dtype {t.dtype}")
    return t if t.is_floating_point() else t.double()


def _reference_rank(rank: RankLike, in_features: int, current: int) -> int:
    """The latent size a core-API ``rank`` asks for, as in the reference implementation (Composer
    0.32.1 ``factorize_core``): a number below 1 is a fraction of the input features,
    ``min(int(rank * in_features), current)`` with ``current`` the number of columns of ``Wa`` (M for
    a dense matrix, the current rank of a pair); any other number is truncated with ``int()``.
    The result may be 0. Negative ranks raise ValueError (the reference returns nonsense shapes)."""
    value = _as_rank_number(rank)
    if value < 0:
        raise ValueError(
            f"rank={rank!r}: the rank must be >= 0 (an int, or a float below 1 for a fraction of the input features)"
        )
    if value < 1:
        return min(int(value * in_features), current)
    return int(value)


def _solve(
    stats: MomentAccumulator,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    rank: int,
    current_rank: Optional[int],
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], int]:
    """Shared core of both wrappers, on float64 matrices: returns (Wa, Wb, bias, rank), with
    Wb None and rank -1 for a dense result and (None, None, bias, -1) for an unchanged pair
    (see ``factorize_matrix``). The bias is the best one for the returned weights."""
    d, m = weight.shape
    if rank >= min(d, m):  # factorizing cannot shrink the layer: the best dense map
        dense, dense_bias = decompose(stats, weight, bias).dense()
        return dense, None, dense_bias, -1
    if current_rank is not None and rank >= current_rank:  # the pair is already small enough
        if stats.has_targets:  # explicit targets: the intercept that fits them best
            bias = stats.mean_y - stats.mean_x @ weight
        return None, None, bias, -1  # implicit targets: the pair's own (combined) bias is exact
    dec = decompose(stats, weight, bias)
    if rank == 0:  # the best constant: the mean output
        return weight.new_zeros(d, 0), weight.new_zeros(0, m), dec.mean_y.clone(), 0
    wa, wb, new_bias = dec.factors(rank)
    return wa, wb, new_bias, rank


def _measured_nmse(
    stats: MomentAccumulator,
    wa: torch.Tensor,
    wb: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    weight: torch.Tensor,
    target_bias: Optional[torch.Tensor],
) -> float:
    """The NMSE of the solution exactly as returned (after the cast to the weights' dtype) on the
    data it was fitted to; the target is the explicit Y, or the original ``weight``, ``target_bias``."""
    product = wa.double() if wb is None else wa.double() @ wb.double()
    return nmse_of(stats, product, None if bias is None else bias.double(), weight, target_bias)


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

    Returns ``Wa`` [D, k], ``Wb`` [k, M] and ``bias`` [M] minimizing, jointly and exactly,
    ``|| Y - (X @ Wa @ Wb + bias) ||_F^2`` (closed form, see ``factorize_plugin.core.solver``).

    Rank semantics (those of the reference implementation, Composer 0.32.1 ``factorize_core``; the
    callback and ``factorize_model`` keep their own meaning of a fraction, see ``resolve_rank``):

    - ``rank`` below 1 (a float, e.g. the default 0.25) is a fraction of the **input features**
      D: ``k = min(int(rank * D), Wa.shape[1])``, i.e. capped by M for a dense matrix and by the
      current rank d of a pair. Any other number is truncated with ``int()`` (``2.7`` is 2).
      Python and NumPy integers and floats and one-element tensors are accepted.
    - ``k >= min(D, M)``: factorizing cannot shrink the layer, so the result is the best **dense**
      map (``Wb`` None, ``rank`` -1), also when the input was a pair.
    - otherwise, for a pair and ``k >= d``: the pair is returned **unchanged** (the same ``Wa`` and
      ``Wb`` objects, ``rank`` -1).
    - otherwise the best rank-``k`` pair, ``rank`` = k.

    Differences from the reference, each where ours is better or the reference fails:

    - every result is the exact optimum for its structure, with a fitted bias (an intercept) on
      every path: the dense result is the least-squares map with intercept (the reference keeps
      the old bias and fits no intercept), the unchanged pair gets the intercept that best fits
      ``Y`` for it (the reference returns the bias as given, or None);
    - ``nmse`` is always the true NMSE of the returned solution on ``X``, ``Y`` (the reference
      reports 0 on its dense and unchanged paths, and divides by one global variance);
    - a rank that resolves to 0 (``rank=0``, or a small fraction such as 0.1 of 8 features) gives,
      as in the reference, ``Wa`` [D, 0], ``Wb`` [0, M] and rank 0; here its bias is the mean of
      ``Y`` and its ``nmse`` is the true one (1, or 0 for constant targets);
    - negative ranks, booleans, NaN and inf raise ValueError (the reference returns meaningless
      shapes or fails in ``int()``); ``n_iters`` must be >= 0 and is not used;
    - integer or boolean ``X`` / ``Y`` are used as float64 (the reference fails in ``lstsq``); an
      integer ``Wa`` is refused (TypeError) rather than rounded;
    - ``X`` / ``Y`` may have any leading shape ([N, D], [B, T, D], ...).

    Args:
        X: inputs [..., D] (any leading shape: [N, D], [B, T, D], ...), any real dtype.
        Y: targets [..., M] with X's leading shape, normally ``X @ W + bias`` of the original layer.
        Wa: the current operator: W [D, M], or the first factor [D, d] of an already-factorized
            pair (progressive case). A finite floating-point tensor.
        Wb: the second factor [d, M] of the current pair, or None.
        bias: the current bias [M], or None (the new bias is fitted jointly, so it does not change
            the optimum).
        rank: see above. Default 0.25: a quarter of D, which is the dense result whenever
            ``int(0.25 * D) >= M``.
        n_iters: kept for compatibility with Composer's signature. The solution is exact in closed
            form, so it is not used (it must be a non-negative int).

    Returns:
        A ``LowRankSolution`` in ``Wa``'s dtype and device, whose ``nmse`` is
        sum (Y - Y_hat)^2 / sum (Y - mean Y)^2 (per-feature means over the samples) of the returned
        tensors, measured on ``X``, ``Y``.

    Raises:
        TypeError: ``X``, ``Y`` or ``Wa`` is not a tensor (e.g. ``Y=None``), or a weight or bias is
            not floating-point.
        ValueError: mismatched shapes, empty ``X``, a bad rank, NaN/inf in ``X``, ``Y``, a weight or
            the bias.
    """
    _check_n_iters(n_iters)
    X = _check_data(X, "X", "the inputs [..., D]")
    Y = _check_data(Y, "Y", "the original layer's outputs on X, [..., M], e.g. X @ W + bias")
    Wa = _check_weight(Wa, "Wa", "the weight W [D, M], or the first factor [D, d] of a pair")
    Wb = _check_weight(Wb, "Wb", "the second factor [d, M] of a pair, or None", optional=True)
    bias = _check_weight(bias, "bias", "the layer's bias [M], or None", optional=True)
    if X.ndim < 2 or Y.ndim < 2:
        raise ValueError(
            f"X and Y must have at least 2 dimensions ([N, D], [N, M]); got {tuple(X.shape)}, {tuple(Y.shape)}"
        )
    if X.shape[:-1] != Y.shape[:-1]:
        raise ValueError(f"X {tuple(X.shape)} and Y {tuple(Y.shape)} must share their leading (sample) dimensions")
    if X.numel() == 0:
        raise ValueError("X is empty: at least one sample is needed")
    d, m = X.shape[-1], Y.shape[-1]
    if Wa.ndim != 2 or Wa.shape[0] != d:
        raise ValueError(f"Wa must be [D={d}, ...], got {tuple(Wa.shape)}")
    f64: dict[str, Any] = dict(dtype=torch.float64, device=X.device)
    if Wb is None:
        if Wa.shape[1] != m:
            raise ValueError(f"Wa must be [D={d}, M={m}] when Wb is None, got {tuple(Wa.shape)}")
        weight, current = Wa.detach().to(**f64), None
    else:
        if Wb.ndim != 2 or Wb.shape != (Wa.shape[1], m):
            raise ValueError(f"Wb must be [{Wa.shape[1]}, M={m}] to follow Wa {tuple(Wa.shape)}, got {tuple(Wb.shape)}")
        weight, current = Wa.detach().to(**f64) @ Wb.detach().to(**f64), Wa.shape[1]
    if bias is not None and bias.shape != (m,):
        raise ValueError(f"bias must have shape [{m}], got {tuple(bias.shape)}")
    b64 = None if bias is None else bias.detach().to(**f64)
    k = _reference_rank(rank, d, Wa.shape[1])

    stats = MomentAccumulator(d, m, device=X.device).update(X, Y)
    stats.check("X and Y")
    wa, wb, new_bias, k = _solve(stats, weight, b64, k, current)
    like: dict[str, Any] = dict(dtype=Wa.dtype, device=Wa.device)
    if wa is None:  # unchanged pair
        wa, wb = Wa, Wb
    else:
        wa, wb = wa.to(**like), None if wb is None else wb.to(**like)
    new_bias = cast(torch.Tensor, new_bias).to(**like)  # explicit targets (Y): _solve fits the intercept
    nmse = _measured_nmse(stats, wa, wb, new_bias, weight, b64)
    return LowRankSolution(Wa=wa, Wb=wb, bias=new_bias, rank=k, nmse=nmse)


def _conv_matrix(
    Wa: torch.Tensor,
    Wb: Optional[torch.Tensor],
    biasA: Optional[torch.Tensor],
    biasB: Optional[torch.Tensor],
    device: torch.device,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(W [D, C_out], bias [C_out] or None) in float64 of a conv weight ``Wa`` with ``biasA``, or of
    the pair ``Wa`` [d, C_in, k_h, k_w], ``Wb`` [C_out, d, 1, 1] with their biases (shapes checked)."""
    f64: dict[str, Any] = dict(dtype=torch.float64, device=device)
    w_mat = conv_weight_to_matrix(Wa.detach()).to(**f64)  # [D, C_out or d]
    b = None if biasA is None else biasA.detach().to(**f64)
    if Wb is None:
        return w_mat, b
    if Wb.ndim != 4 or Wb.shape[1] != Wa.shape[0] or Wb.shape[2:] != (1, 1):
        raise ValueError(f"Wb must be [C_out, {Wa.shape[0]}, 1, 1], got {tuple(Wb.shape)}")
    if biasB is not None and biasB.shape != (Wb.shape[0],):
        raise ValueError(f"biasB must have shape [{Wb.shape[0]}] (Wb's output channels), got {tuple(biasB.shape)}")
    wb_mat = conv_weight_to_matrix(Wb.detach()).to(**f64)  # [d, C_out]
    if b is not None:  # the pair computes Wb (Wa x + biasA) + biasB
        b = b @ wb_mat
    if biasB is not None:
        b = biasB.detach().to(**f64) if b is None else b + biasB.detach().to(**f64)
    return w_mat @ wb_mat, b


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
    the convolution really produces (with its stride, padding, padding mode and dilation). The
    convolution is a matrix product on its input patches, with D = C_in * k_h * k_w input
    features and M = C_out outputs, so ``rank`` means what it means in ``factorize_matrix``.

    Rank semantics: exactly those of ``factorize_matrix`` (the reference implementation's), with
    D = C_in * k_h * k_w; the dense result is one kernel.

    So, as in the reference, the default ``rank=0.25`` is a quarter of C_in * k_h * k_w, and
    gives the **dense** kernel for many 3 x 3 convolutions: whenever ``int(2.25 * C_in) >= C_out``
    (e.g. 8 -> 16 channels); pass an int rank to get a pair there.

    Differences from the reference, each where ours is better or the reference fails:

    - every result is the exact optimum for its structure (the dense kernel is the layer's own,
      or the product of the pair, with its bias);
    - the unchanged pair comes with its correct combined bias ``Wb . biasA + biasB`` (None only
      when neither bias is given); the reference returns no bias there, which computes another
      function; the dense result has a bias too (the reference returns None);
    - ``nmse`` is always the true NMSE of the returned solution (the reference reports 0 on its
      dense and unchanged paths);
    - stride, dilation, every ``padding_mode``, ``padding='same'`` / ``'valid'`` and pairs are
      supported (the reference raises for stride or dilation > 1 and fails for other padding
      modes and string paddings);
    - a rank that resolves to 0 (``rank=0``, or e.g. 0.25 of a 1 x 1 convolution with fewer than
      4 input channels) is taken as 1, the smallest convolution torch can run (the reference
      crashes reshaping a 0-channel kernel; ``factorize_matrix`` returns the rank-0 pair there);
    - negative paddings, strides or dilations below 1, negative ranks and NaN/inf weights raise
      ValueError naming the argument.

    Args:
        X: inputs [N, C_in, H, W], any real dtype.
        Wa: W [C_out, C_in, k_h, k_w], or the first factor [d, C_in, k_h, k_w] of a pair.
        Wb: the second factor [C_out, d, 1, 1] of a pair, or None.
        rank: see above.
        biasA: the bias of W ([C_out]) or, for a pair, of the first factor ([d]).
        biasB: the bias of the second factor ([C_out]); only with ``Wb``.
        n_iters: kept for compatibility; unused (the solution is exact). A non-negative int.
        **conv2d_kwargs: ``stride``, ``padding`` (int, pair, 'same', 'valid'), ``dilation``,
            ``padding_mode`` ('zeros', 'reflect', 'replicate', 'circular'), ``groups`` (must be 1).

    Returns:
        ``LowRankSolution`` with ``Wa`` [k, C_in, k_h, k_w], ``Wb`` [C_out, k, 1, 1],
        ``bias`` [C_out], in ``Wa``'s dtype and device; the dense case returns ``Wa``
        [C_out, C_in, k_h, k_w] and ``Wb`` None, the unchanged case the given ``Wa`` and ``Wb``.
        ``nmse`` is that of the returned tensors on the convolution's outputs on ``X`` (per-channel
        means over all samples and positions).

    Raises:
        RuntimeError: ``biasB`` is given but ``Wb`` is not.
        NotImplementedError: ``groups != 1``.
        TypeError: ``X`` or ``Wa`` is not a tensor, a weight or bias is not floating-point, or an
            unknown conv argument.
        ValueError: mismatched shapes, empty ``X``, a bad rank or conv argument, NaN/inf in ``X``
            or in a weight or bias.
    """
    if biasB is not None and Wb is None:
        raise RuntimeError("biasB was given but Wb is None: biasB is the bias of the second factor Wb")
    _check_n_iters(n_iters)
    X = _check_data(X, "X", "the inputs [N, C_in, H, W]")
    Wa = _check_weight(
        Wa, "Wa", "the conv weight [C_out, C_in, k_h, k_w], or the first factor [d, C_in, k_h, k_w] of a pair"
    )
    Wb = _check_weight(Wb, "Wb", "the second factor [C_out, d, 1, 1] of a pair, or None", optional=True)
    biasA = _check_weight(biasA, "biasA", "the bias of W [C_out], or of the first factor [d] of a pair", optional=True)
    biasB = _check_weight(biasB, "biasB", "the bias of the second factor [C_out]", optional=True)
    if Wa.ndim != 4:
        raise ValueError(f"Wa must be a 4-D conv weight, got shape {tuple(Wa.shape)}")
    geometry = ConvGeometry.from_kwargs(tuple(Wa.shape[2:]), **conv2d_kwargs)
    if X.ndim != 4 or X.shape[1] != Wa.shape[1]:
        raise ValueError(f"X must be [N, C_in={Wa.shape[1]}, H, W], got {tuple(X.shape)}")
    if X.numel() == 0:
        raise ValueError("X is empty: at least one sample is needed")
    c_in = Wa.shape[1]
    if biasA is not None and biasA.shape != (Wa.shape[0],):
        raise ValueError(f"biasA must have shape [{Wa.shape[0]}] (Wa's output channels), got {tuple(biasA.shape)}")
    w_mat, b = _conv_matrix(Wa, Wb, biasA, biasB, X.device)
    current = None if Wb is None else Wa.shape[0]
    d, m = w_mat.shape
    k = max(1, _reference_rank(rank, d, Wa.shape[0]))  # no 0-channel kernels (see above)

    stats = MomentAccumulator(d, device=X.device)
    for patches in iter_conv_patches(X.detach(), geometry):
        stats.update(patches)
    stats.check("X")
    wa, wb, new_bias, k = _solve(stats, w_mat, b, k, current)
    like: dict[str, Any] = dict(dtype=Wa.dtype, device=Wa.device)
    if wa is None:  # unchanged pair, with its combined bias
        wa_conv, wb_conv = Wa, Wb
    else:
        wa_conv = matrix_to_conv_weight(wa, c_in, geometry.kernel_size).to(**like)
        wb_conv = None if wb is None else matrix_to_conv_weight(wb, k, (1, 1)).to(**like)
    new_bias = None if new_bias is None else new_bias.to(**like)
    nmse = _measured_nmse(
        stats,
        conv_weight_to_matrix(wa_conv.detach()),
        None if wb_conv is None else conv_weight_to_matrix(wb_conv.detach()),
        new_bias,
        w_mat,
        b,
    )
    return LowRankSolution(Wa=wa_conv, Wb=wb_conv, bias=new_bias, rank=k, nmse=nmse)
