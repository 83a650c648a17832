"""The exact low-rank least-squares solver, working from streamed moments.

Problem: given samples x [D] with targets y [M], find P = Wa @ Wb of rank r and a bias b minimizing

    E(P, b) = sum_n || y_n - (x_n @ P + b) ||^2.

The optimal bias is b = mean_y - mean_x @ P, which leaves a problem in the centered moments
C = cov(x) (sums, [D, D]), Cxy [D, M], Syy = sum ||y - mean_y||^2:

    E(P) = tr(P^T C P) - 2 tr(P^T Cxy) + Syy = || L (P - B) ||_F^2 + E(B),

where B is any least-squares solution (C B = Cxy) and L^T L = C. The minimizer of rank r is
therefore P = B V_r V_r^T, with V_r the top-r right singular vectors of L B (reduced-rank
regression, Eckart-Young in the metric of C): a closed form, exact, and one SVD gives every rank.

Regularization ``alpha`` replaces C by A = C + alpha * tr(C)/D * I in that metric and in B (which
becomes the ridge solution shrunk toward the original W). ``alpha = 0`` is the data-optimal fit;
``alpha -> inf`` tends to the data-free truncated SVD of W. When the target is the layer's own
output (y = x @ W + b) then Cxy = C W, B = W for every alpha, and only C is needed.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from typing import Optional, Union

import torch

from .statistics import MomentAccumulator

RankLike = Union[int, float]


@dataclasses.dataclass
class LowRankSolution:
    """Bundles the tensors of a factorized linear operator.

    Args:
        Wa: the first operator, into ``rank`` latent features. Matrix case: [D, rank]; conv case:
            [rank, C_in, k_h, k_w].
        Wb: the second operator, out of the latent features. Matrix case: [rank, M]; conv case:
            [C_out, rank, 1, 1].
        bias: [M] (or [C_out]) added after ``Wb``.
        rank: the latent size; -1 when no factorization was made (see ``factorize_matrix``).
        nmse: sum (y - y_hat)^2 / sum (y - mean y)^2 on the data the solution was fitted to, with
            the mean taken per output feature over the samples: 0 is exact, 1 is no better than
            predicting each output's mean.
    """

    Wa: Optional[torch.Tensor] = None
    Wb: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    rank: int = -1
    nmse: float = 0.0


def _as_rank_number(rank: object, name: str = "rank") -> Union[int, float]:
    """A rank request as a plain ``int`` or ``float``: Python and NumPy integers and floats, and
    0-d (or one-element) integer or floating tensors, are accepted (the reference implementation
    casts with ``int()``); booleans, strings, NaN, inf and anything else raise ValueError."""
    value = rank
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(
                f"{name} must be an int or a float (or a one-element integer or floating tensor), "
                f"got a {value.dtype} tensor of shape {tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a float, got the boolean {rank!r}")
    if isinstance(value, numbers.Integral):
        return operator.index(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {rank!r}")
        return value
    raise ValueError(f"{name} must be an int or a float, got {rank!r} ({type(rank).__name__})")


def resolve_rank(rank: RankLike, in_features: int, out_features: int, name: str = "rank") -> int:
    """Turns a rank request into an int >= 1.

    An int is taken as is; a float in (0, 1) is a fraction of min(in_features, out_features),
    rounded down but at least 1. Integer-like values (NumPy integers, a 0-d integer tensor) count
    as ints and NumPy floats or a 0-d floating tensor as floats. Raises ValueError for anything
    else (0, negatives, floats >= 1, booleans, NaN).

    This is the model-level meaning of a fraction (the callback, ``factorize_model``); the core
    ``factorize_matrix`` / ``factorize_conv2d`` follow the reference implementation's instead.
    """
    try:
        value = _as_rank_number(rank, name)
    except ValueError:
        raise ValueError(f"{name} must be an int >= 1 or a float in (0, 1), got {rank!r}") from None
    if isinstance(value, float):
        if not 0.0 < value < 1.0:
            raise ValueError(
                f"{name}={rank!r}: a float rank is a fraction of min(in, out) and must lie in (0, 1); "
                "pass an int for an absolute rank"
            )
        return max(1, int(value * min(in_features, out_features)))
    if value < 1:
        raise ValueError(f"{name}={value}: the rank must be at least 1")
    return int(value)


def _check_regularization(regularization: object) -> float:
    if isinstance(regularization, torch.Tensor) and regularization.numel() == 1 and regularization.is_floating_point():
        regularization = regularization.item()
    if isinstance(regularization, bool) or not isinstance(regularization, numbers.Real):
        raise ValueError(f"regularization must be a finite float >= 0, got {regularization!r}")
    value = float(regularization)
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"regularization must be a finite float >= 0 (0: the exact data-optimal fit; larger values "
            f"move toward the truncated SVD of the weight), got {regularization!r}"
        )
    return value


def _check_finite(t: torch.Tensor, name: str) -> None:
    """Raises ValueError naming ``name`` if the tensor holds NaN or inf."""
    if not t.is_floating_point() and not t.is_complex():
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        raise ValueError(
            f"{name} contains NaN or inf values ({int(bad.sum())} of {t.numel()} entries): "
            "the weights and biases to factorize must be finite"
        )


def _sqrt_metric(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For symmetric PSD A [D, D]: returns (L [D, D] with L^T L = A, eigenvalues, eigenvectors)."""
    evals, evecs = torch.linalg.eigh(a)
    evals = evals.clamp_min(0.0)
    return evals.sqrt()[:, None] * evecs.T, evals, evecs


@dataclasses.dataclass
class _Targets:
    """Centered target moments implied by the statistics: Cxy [D, M], Syy, mean_y [M]."""

    cxy: torch.Tensor
    syy: torch.Tensor
    mean_y: torch.Tensor


def _targets(stats: MomentAccumulator, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> _Targets:
    if stats.has_targets:
        return _Targets(stats.cxy, stats.syy, stats.mean_y)
    cw = stats.cxx @ weight
    mean_y = stats.mean_x @ weight
    if bias is not None:
        mean_y = mean_y + bias
    return _Targets(cw, (weight * cw).sum(), mean_y)


class LowRankDecomposition:
    """The exact solution at every rank, from one SVD.

    ``P(r) = B @ V[:, :r] @ V[:, :r].T`` with the bias fitted jointly. Build it with ``decompose``.

    Attributes:
        max_rank: k = min(D, M), the largest rank the curve covers.
        nmse_curve: float64 [k + 1], the NMSE at ranks 0..k on the statistics it was fitted to.
    """

    def __init__(
        self,
        stats: MomentAccumulator,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        regularization: float = 0.0,
    ) -> None:
        stats.check()
        self.regularization = _check_regularization(regularization)
        if weight.ndim != 2:
            raise ValueError(f"weight must be a [D, M] matrix, got shape {tuple(weight.shape)}")
        _check_finite(weight, "weight")
        if bias is not None:
            _check_finite(bias, "bias")
        d, m = weight.shape
        self.in_features, self.out_features = d, m
        self.max_rank = min(d, m)
        self.weight = self._solving_weight(stats, weight)
        self.bias = None if bias is None else bias.detach().to(dtype=torch.float64, device=stats.device)
        self.mean_x = stats.mean_x.clone()

        l_metric, evals, evecs = _sqrt_metric(self._metric(stats))
        tgt = _targets(stats, self.weight, self.bias)
        self.mean_y = tgt.mean_y.clone()
        if stats.has_targets:
            # B = W + A^+ (Cxy - C W): the least-squares (or ridge) solution closest to W.
            cutoff = evals.max() * self.weight.shape[0] * torch.finfo(torch.float64).eps
            inv = torch.where(evals > cutoff, 1.0 / evals.clamp_min(cutoff), torch.zeros_like(evals))
            resid = tgt.cxy - stats.cxx @ self.weight
            self.B = self.weight + evecs @ (inv[:, None] * (evecs.T @ resid))
        else:
            self.B = self.weight
        self.V = self._output_directions(l_metric @ self.B)
        self.G = self.B @ self.V  # [D, k]: P(r) = G[:, :r] @ V[:, :r].T
        self.nmse_curve = self._curve(stats, tgt)

    def _solving_weight(self, stats: MomentAccumulator, weight: torch.Tensor) -> torch.Tensor:
        """W [D, M] in float64, checked against the statistics. With projected statistics
        (z = x @ W) the problem is solved in z-space with weight I [M, M]; the input map W is
        applied to the first factor at the end (``self.input_map``)."""
        d, m = weight.shape
        f64 = dict(dtype=torch.float64, device=stats.device)
        self.input_map = None if stats.projection is None else stats.projection.to(stats.device)
        d_space = d
        if self.input_map is not None:
            if self.input_map.shape != (d, m):
                raise ValueError(f"the statistics are projected by a {tuple(self.input_map.shape)} map, not W {(d, m)}")
            if not torch.allclose(weight.detach().to(**f64), self.input_map, rtol=1e-6, atol=1e-9):
                raise ValueError(
                    "the layer's weights changed after its projected statistics (x @ W) were collected: collect "
                    "them again right before solving, or collect input statistics instead"
                )
            weight, d_space = torch.eye(m, **f64), m
        if d_space != stats.in_features:
            raise ValueError(f"weight has {d_space} input features but the statistics have {stats.in_features}")
        if stats.has_targets and m != stats.out_features:
            raise ValueError(f"weight has {m} output features but the statistics have {stats.out_features}")
        return weight.detach().to(**f64)

    def _metric(self, stats: MomentAccumulator) -> torch.Tensor:
        """A [D, D]: the input covariance C, plus the regularization. Explicit targets: a ridge
        alpha * tr(C) / D * I. Implicit targets (the layer's own output): alpha * s * R with
        s = tr(W^T C W) / |W|^2 and R the metric of W's input space, the same fit in input and
        projected space. Large alpha moves the fit toward the truncated SVD of W in both cases."""
        c = stats.cxx
        if not self.regularization:
            return c
        tiny = torch.finfo(torch.float64).tiny
        d = c.shape[0]
        eye = torch.eye(d, dtype=torch.float64, device=c.device)
        if stats.has_targets:
            return c + (self.regularization * (torch.diagonal(c).sum() / d).clamp_min(tiny)) * eye
        w_eff = self.weight if self.input_map is None else self.input_map
        s = ((self.weight * (c @ self.weight)).sum() / w_eff.square().sum()).clamp_min(tiny)
        r = eye if self.input_map is None else self.input_map.T @ self.input_map
        return c + (self.regularization * s) * r

    def _output_directions(self, metric_b: torch.Tensor) -> torch.Tensor:
        """V [M, k]: the right singular vectors of L B (L: the square root of the metric), sorted by
        singular value, each with its largest entry positive so that equal statistics give equal
        factors on every process and run (not factors equal only up to sign)."""
        _, _, vh = torch.linalg.svd(metric_b, full_matrices=False)
        v = vh[: self.max_rank].T
        pivot = v[v.abs().argmax(0), torch.arange(v.shape[1], device=v.device)]
        return (v * torch.where(pivot < 0, -1.0, 1.0).to(v)).contiguous()

    def _curve(self, stats: MomentAccumulator, tgt: _Targets) -> torch.Tensor:
        """NMSE at ranks 0..k on ``stats`` (bias fitted on the training statistics)."""
        q = (stats.cxx @ self.G * self.G).sum(0)  # g_i^T C g_i
        cross = (self.G * (tgt.cxy @ self.V)).sum(0)  # g_i^T Cxy v_i
        n = stats.count
        dx = stats.mean_x - self.mean_x
        dy = tgt.mean_y - self.mean_y
        a = dx @ self.G  # [k]
        per_rank = q - 2 * cross + n * (a.square() - 2 * a * (dy @ self.V))
        zero = per_rank.new_zeros(1)
        err = tgt.syy + n * dy.square().sum() + torch.cat([zero, per_rank.cumsum(0)])
        err = err.clamp_min(0.0)
        denom = tgt.syy
        if denom <= 0:
            return torch.where(err > 0, torch.ones_like(err), torch.zeros_like(err))
        return err / denom

    def nmse_on(self, stats: MomentAccumulator) -> torch.Tensor:
        """NMSE at ranks 0..k on other (e.g. held-out) statistics of the same layer: [k + 1]."""
        stats.check("held-out inputs")
        return self._curve(stats, _targets(stats, self.weight, self.bias))

    def smallest_rank(self, max_nmse: float) -> int:
        """The smallest rank >= 1 whose NMSE on the fitted statistics is <= ``max_nmse``."""
        ok = (self.nmse_curve[1:] <= max_nmse).nonzero()
        return int(ok[0].item()) + 1 if len(ok) else self.max_rank

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Wa [D, rank], Wb [rank, M], bias [M]) in float64; Wa's columns and Wb's rows carry
        equal norms, which keeps later gradient training well balanced."""
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank must be in [1, {self.max_rank}], got {rank}")
        g, v = self.G[:, :rank], self.V[:, :rank]
        bias = self.mean_y - self.mean_x @ g @ v.T
        if self.input_map is not None:
            g = self.input_map @ g
        norms = g.norm(dim=0).sqrt().clamp_min(torch.finfo(torch.float64).tiny)
        wa = g / norms
        wb = norms[:, None] * v.T
        return wa, wb, bias

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B [D, M], bias [M]): the best full-rank map and its bias, float64."""
        bias = self.mean_y - self.mean_x @ self.B
        return (self.B if self.input_map is None else self.input_map @ self.B), bias


def decompose(
    stats: MomentAccumulator,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    regularization: float = 0.0,
) -> LowRankDecomposition:
    """Solves the low-rank problem for every rank at once.

    Args:
        stats: moments of the layer's inputs x [.., D] (and of explicit targets y [.., M], if it
            tracks them; otherwise the target is the layer's own output x @ weight + bias). Or
            moments of the projected inputs z = x @ weight [.., M] (``stats.projection`` is then
            ``weight``): the same solution from O(M^2) instead of O(D^2) memory.
        weight: W [D, M], the current operator (``Wa @ Wb`` for an already-factorized layer).
        bias: [M] or None, the current bias (only used when the target is implicit).
        regularization: alpha >= 0; 0 gives the exact data-optimal fit, larger values move toward
            the truncated SVD of W, for implicit and explicit targets alike (useful with few
            calibration samples; choose it with ``nmse_on`` on held-out statistics).
    """
    return LowRankDecomposition(stats, weight, bias, regularization)


def nmse_of(
    stats: MomentAccumulator,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target_weight: Optional[torch.Tensor] = None,
    target_bias: Optional[torch.Tensor] = None,
) -> float:
    """NMSE of the map ``x @ weight + bias`` [D, M] against the targets in ``stats`` (explicit
    targets, or the implicit ``x @ target_weight + target_bias``)."""
    stats.check()
    dev = stats.device
    w = weight.detach().to(dev, torch.float64)
    b = torch.zeros(w.shape[1], dtype=torch.float64, device=dev) if bias is None else bias.detach().to(dev, torch.float64)
    if target_weight is None:  # the map's own output is the target: only the bias can be off
        tw, tb = w, (b if target_bias is None else target_bias.detach().to(dev, torch.float64))
    else:
        tw = target_weight.detach().to(dev, torch.float64)
        tb = None if target_bias is None else target_bias.detach().to(dev, torch.float64)
    tgt = _targets(stats, tw, tb)
    err = (stats.cxx @ w * w).sum() - 2 * (w * tgt.cxy).sum() + tgt.syy
    err = err + stats.count * (tgt.mean_y - stats.mean_x @ w - b).square().sum()
    err = float(err.clamp_min(0.0))
    denom = float(tgt.syy)
    return err / denom if denom > 0 else (0.0 if err == 0 else 1.0)
