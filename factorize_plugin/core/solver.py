"""The exact low-rank least-squares solver, working from streamed moments.

Problem: given samples x [D] with targets y [M], find P = Wa @ Wb of rank r and a bias b minimizing

    E(P, b) = sum_n || y_n - (x_n @ P + b) ||^2.

The optimal bias is b = mean_y - mean_x @ P, which leaves a problem in the centered moments
C = cov(x) (sums, [D, D]), Cxy [D, M], Syy = sum ||y - mean_y||^2:

    E(P) = tr(P^T C P) - 2 tr(P^T Cxy) + Syy = || L (P - B) ||_F^2 + E(B),

where B is any least-squares solution (C B = Cxy) and L^T L = C. The minimizer of rank r is
therefore P = B V_r V_r^T, with V_r the top-r right singular vectors of L B (reduced-rank
regression, Eckart-Young in the metric of C): a closed form, exact, and one decomposition gives
every rank. V is found from the smaller side: the eigenvectors of B^T C B [M, M] when M <= D (no
[D, D] decomposition at all when the target is the layer's own output); when M > D and the target
is the layer's own output (B = W), from R C R^T [D, D] with R the Cholesky factor of W W^T (no
factor of C, which is singular wherever the data reach fewer than D directions); else from
L B B^T L^T [D, D] with L a Cholesky factor of C. The NMSE curve comes from the eigenvalues; V is
formed only for the columns a caller asks for (``factors``).

Without a bias (``fit_bias=False``: the layer has none, and its pair gets none) the same holds in
the uncentered moments C + n mean_x mean_x^T (and likewise for Cxy, Syy): the exact minimizer of
sum || y_n - x_n @ P ||^2. The NMSE's denominator stays the centered Syy in both cases, so the
curve is the installed layer's error, comparable between layers with and without a bias.

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
from typing import Any, Optional, Union, cast

import torch

from .statistics import MomentAccumulator, add_gram_

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


def _metric_root(a: torch.Tensor) -> torch.Tensor:
    """R [D, D] with R^T R = A (symmetric PSD): the Cholesky factor, or from the eigendecomposition
    where A is singular (fewer independent rows than features)."""
    chol, info = torch.linalg.cholesky_ex(a, upper=True)
    if int(info) == 0:
        return chol
    evals, evecs = torch.linalg.eigh(a)
    return evals.clamp_min(0.0).sqrt()[:, None] * evecs.T


@dataclasses.dataclass
class _Moments:
    """The data as the fit sees it: second moments about the fit's origin (the means when a bias is
    fitted, zero when not), and ``total`` = sum ||y - mean_y||^2, the NMSE's denominator.

    count: n; mean_x [D], mean_y [M]: the origin; cxx [D, D], cxy [D, M] (None where ``_moments`` left
    it out), syy: the moments about it.
    """

    count: torch.Tensor
    mean_x: torch.Tensor
    mean_y: torch.Tensor
    cxx: torch.Tensor
    cxy: Optional[torch.Tensor]
    syy: torch.Tensor
    total: torch.Tensor


def _moments(
    stats: MomentAccumulator,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    fit_bias: bool,
    wwt: Optional[torch.Tensor] = None,
    identity: bool = False,
) -> _Moments:
    """The moments of ``stats`` for a fit with or without a bias; without explicit targets the
    target is x @ weight + bias (bias None: no bias). Given ``wwt`` = W W^T [D, D] (cheaper than
    C W when M > D) the implicit target's Syy comes from it and ``cxy`` is left out (None): the
    caller then has Cxy V = C G itself. ``identity``: the weight is I (projected statistics)."""
    n = stats.count
    if stats.has_targets:
        cxx, cxy, syy, mean_y = stats.cxx, stats.cxy, stats.syy, stats.mean_y
    elif identity:
        cxx = cxy = stats.cxx
        syy, mean_y = torch.diagonal(cxx).sum(), stats.mean_x
    else:
        cxx = stats.cxx
        if wwt is not None:
            cxy, syy = None, (cxx * wwt).sum()
        else:
            cxy = cxx @ weight
            syy = (weight * cxy).sum()
        mean_y = stats.mean_x @ weight
    if not stats.has_targets and bias is not None:
        mean_y = mean_y + bias
    if fit_bias:
        return _Moments(n, stats.mean_x, mean_y, cxx, cxy, syy, syy)
    mx = stats.mean_x
    return _Moments(
        n, torch.zeros_like(mx), torch.zeros_like(mean_y), cxx + n * torch.outer(mx, mx),
        None if cxy is None else cxy + n * torch.outer(mx, mean_y), syy + n * mean_y.square().sum(), syy,
    )


@dataclasses.dataclass
class _WeightSide:
    """What a solve needs of the weight alone, shared by the fits of one layer on other statistics
    (``LowRankDecomposition.refit``, e.g. a held-out half).

    weight: W [D, M] float64 as solved (I [M, M] for projected statistics); input_map: the
    projection W0 [D0, M] in float64, or None; projection: the statistics' snapshot it came from;
    wwt: S = W W^T [D, D] where M > D and the target is the layer's own output (else None); root:
    R [D, D] upper triangular with R^T R = S, or None where S is singular or too ill-conditioned.
    """

    weight: torch.Tensor
    input_map: Optional[torch.Tensor]
    projection: Optional[torch.Tensor]
    wwt: Optional[torch.Tensor]
    root: Optional[torch.Tensor]


ROOT_CONDITION = 1e-4
"""Smallest ratio of the diagonal entries of S's Cholesky factor R for V = W^T R^-1 Z: its loss of
orthonormality grows like eps * cond(S), so worse-conditioned weights use the metric's root instead."""


def _weight_side(stats: MomentAccumulator, weight: torch.Tensor, same_cross: bool) -> _WeightSide:
    """W [D, M] in float64, checked against the statistics, and S = W W^T with its Cholesky factor.
    With projected statistics (z = x @ W) the problem is solved in z-space with weight I [M, M];
    the input map W is applied to the first factor at the end."""
    d, m = weight.shape
    f64: dict[str, Any] = dict(dtype=torch.float64, device=stats.device)
    # the projection is stored in W's own dtype: upcast (exactly) to float64 here
    input_map = None if stats.projection is None else stats.projection.to(**f64).contiguous()
    if input_map is not None:
        if input_map.shape != (d, m):
            raise ValueError(f"the statistics are projected by a {tuple(input_map.shape)} map, not W {(d, m)}")
        if not torch.allclose(weight.detach().to(**f64), input_map, rtol=1e-6, atol=1e-9):
            raise ValueError(
                "the layer's weights changed after its projected statistics (x @ W) were collected: collect "
                "them again right before solving, or collect input statistics instead"
            )
        w = torch.eye(m, **f64)
    else:
        w = weight.detach().to(**f64)
    wwt = root = None
    if same_cross and w.shape[1] > w.shape[0]:
        wwt = add_gram_(w.new_zeros(w.shape[0], w.shape[0]), w.T)
        chol, info = torch.linalg.cholesky_ex(wwt, upper=True)
        diag = chol.diagonal()
        if int(info) == 0 and bool(diag.min() > diag.max() * ROOT_CONDITION):
            root = chol
    return _WeightSide(w, input_map, stats.projection, wwt, root)


TRIANGULAR_BLOCKS = 8
"""Row blocks of ``_triangular_matmul``: its work is about (1 + 1/blocks) / 2 of a full product."""


def _triangular_matmul(t: torch.Tensor, x: torch.Tensor, lower: bool = False) -> torch.Tensor:
    """T @ X for T [D, D] upper (or ``lower``) triangular and X [D, n], skipping T's zero blocks."""
    d = t.shape[0]
    blocks = min(TRIANGULAR_BLOCKS, d // 128)
    if blocks < 2:
        return t @ x
    out = x.new_empty(d, x.shape[1])
    edges = [i * d // blocks for i in range(blocks + 1)]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        out[lo:hi] = t[lo:hi, :hi] @ x[:hi] if lower else t[lo:hi, lo:] @ x[lo:]
    return out


def _signed(v: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, G) with each column of V [M, r] (and the same column of G [D, r]) flipped so that its
    largest entry is positive: equal statistics give equal factors on every process and run."""
    pivot = v[v.abs().argmax(0), torch.arange(v.shape[1], device=v.device)]
    flip = torch.where(pivot < 0, -1.0, 1.0).to(v)
    return (v * flip).contiguous(), g * flip


def _normalized(err: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """err [k + 1] (clamped at 0) / total, with 0/0 = 0 and x/0 = 1 for x > 0."""
    err = err.clamp_min(0.0)
    if total <= 0:
        return torch.where(err > 0, torch.ones_like(err), torch.zeros_like(err))
    return err / total


class LowRankDecomposition:
    """The exact solution at every rank, from one symmetric eigendecomposition of the smaller side.

    ``P(r) = B @ V[:, :r] @ V[:, :r].T``, with a bias fitted jointly (``fit_bias``) or none. Build it
    with ``decompose``. V [M, k] and G = B V [D, k] are kept in the eigenbasis Z of the matrix that
    was decomposed and formed when asked for (``factors`` forms only the columns it returns).

    Attributes:
        max_rank: k = min(D, M), the largest rank the curve covers.
        fit_bias: whether the factors come with a fitted bias (else ``factors`` returns None for it).
        nmse_curve: float64 [k + 1], the NMSE at ranks 0..k on the statistics it was fitted to.
        sigma2: float64 [k], the squared singular values of L B (descending): the error each rank removes.
    """

    def __init__(
        self,
        stats: MomentAccumulator,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        regularization: float = 0.0,
        fit_bias: bool = True,
        _side: Optional[_WeightSide] = None,
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
        self.fit_bias = bool(fit_bias)
        self._explicit = stats.has_targets
        # Cxy = C W when the target is the layer's own output x W (+ a bias fitted away)
        self._same_cross = not stats.has_targets and (bias is None or self.fit_bias)
        self._side = _weight_side(stats, weight, self._same_cross) if _side is None else _side
        self.weight, self.input_map = self._side.weight, self._side.input_map
        self._check_against(stats, weight)
        self.bias = None if bias is None else bias.detach().to(dtype=torch.float64, device=stats.device)

        self._identity = self.input_map is not None  # projected statistics: W = I
        mom = _moments(stats, self.weight, self.bias, self.fit_bias, self._side.wwt, self._identity)
        self.mean_x, self.mean_y = mom.mean_x.clone(), mom.mean_y.clone()
        if stats.has_targets:
            # B = W + A^+ (Cxy - C W): the least-squares (or ridge) solution closest to W.
            evals, evecs = torch.linalg.eigh(self._metric(mom.cxx))
            cutoff = evals.max().clamp_min(0.0) * self.weight.shape[0] * torch.finfo(torch.float64).eps
            inv = torch.where(evals > cutoff, 1.0 / evals.clamp_min(cutoff), torch.zeros_like(evals))
            cxy = cast(torch.Tensor, mom.cxy)  # explicit targets: _moments formed Cxy
            self.B = self.weight + evecs @ (inv[:, None] * (evecs.T @ (cxy - mom.cxx @ self.weight)))
        else:
            self.B = self.weight
        self._cache: dict[str, torch.Tensor] = {}
        self._solve(mom.cxx, mom.cxy if self._same_cross else None)
        if self._same_cross and not self.regularization:
            gains = self.sigma2  # g_i^T C g_i = sigma_i^2 and g_i^T Cxy v_i = g_i^T C g_i: the metric is C itself
        else:
            g = self._g_all()
            cg = mom.cxx @ g
            q = (cg * g).sum(0)
            # not same_cross: no W W^T was passed, so _moments formed Cxy
            gains = 2 * (q if self._same_cross else (g * (cast(torch.Tensor, mom.cxy) @ self._v_all())).sum(0)) - q
        zero = gains.new_zeros(1)
        self.nmse_curve = _normalized(mom.syy - torch.cat([zero, gains.cumsum(0)]), mom.total)

    def _check_against(self, stats: MomentAccumulator, weight: torch.Tensor) -> None:
        """The statistics fit the weight side (a refit's statistics may be another accumulator)."""
        side, (d, m) = self._side, weight.shape
        if (stats.projection is None) != (side.input_map is None):
            raise ValueError("statistics to refit must be projected exactly when the fitted ones were")
        if stats.projection is not None and stats.projection is not side.projection:
            input_map = cast(torch.Tensor, side.input_map)  # projected both, as checked above
            if not torch.allclose(stats.projection.to(input_map), input_map, rtol=1e-6, atol=1e-9):
                raise ValueError("statistics to refit were projected by another map than the fitted ones")
        d_space = d if side.input_map is None else m
        if d_space != stats.in_features:
            raise ValueError(f"weight has {d_space} input features but the statistics have {stats.in_features}")
        if stats.has_targets and m != stats.out_features:
            raise ValueError(f"weight has {m} output features but the statistics have {stats.out_features}")

    def refit(self, stats: MomentAccumulator) -> "LowRankDecomposition":
        """The same layer's problem (weight, bias, regularization, ``fit_bias``) solved on other
        statistics of it, e.g. one held-out half: what depends on the weight alone is reused."""
        weight = self.weight if self.input_map is None else self.input_map
        return LowRankDecomposition(stats, weight, self.bias, self.regularization, self.fit_bias, _side=self._side)

    def _regularizer(self, c: torch.Tensor) -> Optional[torch.Tensor]:
        """What the regularization adds to the metric C [D, D] (None at alpha = 0). Explicit targets:
        a ridge alpha * tr(C) / D * I. Implicit targets (the layer's own output): alpha * s * R with
        s = tr(W^T C W) / |W|^2 and R the metric of W's input space, the same fit in input and
        projected space. Large alpha moves the fit toward the truncated SVD of W in both cases."""
        if not self.regularization:
            return None
        tiny = torch.finfo(torch.float64).tiny
        d = c.shape[0]
        eye = torch.eye(d, dtype=torch.float64, device=c.device)
        if self._explicit:
            return (self.regularization * (torch.diagonal(c).sum() / d).clamp_min(tiny)) * eye
        w_eff = self.weight if self.input_map is None else self.input_map
        s = ((self.weight * (c @ self.weight)).sum() / w_eff.square().sum()).clamp_min(tiny)
        r = eye if self.input_map is None else self.input_map.T @ self.input_map
        return (self.regularization * s) * r

    def _metric(self, c: torch.Tensor) -> torch.Tensor:
        """A [D, D]: the metric of the fit, C plus the regularization (``_regularizer``)."""
        extra = self._regularizer(c)
        return c if extra is None else c + extra

    def _solve(self, c: torch.Tensor, cb: Optional[torch.Tensor] = None) -> None:
        """The right singular vectors V of L B (L^T L = A, the metric built on C [D, D]) and their
        squared singular values ``sigma2``, from the eigendecomposition of the smaller side:

        * M <= D (kind "output"): the eigenvectors Z of B^T A B [M, M] are V itself (A itself where
          B = I: projected statistics);
        * M > D, the target the layer's own output (B = W) and S = W W^T = R^T R well conditioned
          (kind "input"): W = R^T Q with Q = R^-T W of orthonormal rows, so V = Q^T Z with Z the
          eigenvectors of R A R^T [D, D], and G = B V = R^T Z: no factor of the metric, which is
          singular wherever the data reach fewer than D directions;
        * otherwise (kind "eager"): with L^T L = A and S = B B^T, the eigenvectors U of L S L^T give
          Y = L^T U / sigma, V = B^T Y and G = S Y; where the data reach fewer than D directions
          (sigma = 0), V is completed by a QR decomposition, which keeps each leading span.
        """
        b, k = self.B, self.max_rank
        d, m = b.shape
        extra = self._regularizer(c)
        a = c if extra is None else c + extra
        root = self._side.root if self._same_cross else None
        if m <= d or root is not None:
            if m > d and root is not None:  # R A R^T = R (R A)^T, A symmetric (m > d: root is set)
                self._kind, gram = "input", _triangular_matmul(root, _triangular_matmul(root, a).T)
            elif self._identity and b is self.weight:
                self._kind, gram = "output", a
            else:
                cb = c @ b if cb is None else cb  # the caller's C B (C W: the moments' Cxy)
                self._kind, gram = "output", b.T @ (cb if extra is None else cb + extra @ b)
            evals, z = torch.linalg.eigh((gram + gram.T) / 2)
            self._z = z.flip(-1)[:, :k]
            self.sigma2 = evals.flip(-1)[:k].clamp_min(0.0)
            return
        self._kind = "eager"
        root_a = _metric_root(a)
        bbt = b @ b.T if self._side.wwt is None or not self._same_cross else self._side.wwt
        gram = root_a @ bbt @ root_a.T
        evals, u = torch.linalg.eigh((gram + gram.T) / 2)
        u, sigma2 = u.flip(-1), evals.flip(-1).clamp_min(0.0)
        sigma = sigma2.sqrt()
        floor = sigma[0] * max(d, m) * torch.finfo(torch.float64).eps
        reached = sigma > floor
        y = (root_a.T @ u) / torch.where(reached, sigma, torch.full_like(sigma, math.inf))
        v = b.T @ y
        if bool(reached.all()):
            g = bbt @ y
        else:
            v = torch.linalg.qr(v).Q
            g = b @ v
        self.sigma2 = torch.where(reached, sigma2, torch.zeros_like(sigma2))
        self._cache.update(v=v, g=g)

    @property
    def _input_root(self) -> torch.Tensor:
        """R of the weight side, which kind "input" has (``_solve`` chose that kind for it)."""
        return cast(torch.Tensor, self._side.root)

    def _columns(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(V [M, r], G [D, r]): the first r directions, before the sign convention."""
        if "v" in self._cache and "g" in self._cache:
            return self._cache["v"][:, :r], self._cache["g"][:, :r]
        z = self._z[:, :r]
        if self._kind == "input":
            root = self._input_root
            v = self.weight.T @ torch.linalg.solve_triangular(root, z, upper=True)
            return v, _triangular_matmul(root.T, z, lower=True)
        return z, (z if self._identity and self.B is self.weight else self.B @ z)

    def _g_all(self) -> torch.Tensor:
        """G = B V [D, k] (before the sign convention)."""
        if "g" not in self._cache:
            z = self._z
            if self._kind == "input":
                self._cache["g"] = _triangular_matmul(self._input_root.T, z, lower=True)
            else:
                self._cache["g"] = z if self._identity and self.B is self.weight else self.B @ z
        return self._cache["g"]

    def _v_all(self) -> torch.Tensor:
        """V [M, k] (before the sign convention)."""
        if "v" not in self._cache:
            z = self._z
            if self._kind == "input":
                z = self.weight.T @ torch.linalg.solve_triangular(self._input_root, z, upper=True)
            self._cache["v"] = z
        return self._cache["v"]

    def _v_dot(self, u: torch.Tensor) -> torch.Tensor:
        """u @ V [k] for u [M] (before the sign convention), without forming V."""
        if "v" in self._cache or self._kind == "output":
            return u @ self._v_all()
        root = self._input_root
        s = torch.linalg.solve_triangular(root.T, (self.weight @ u)[:, None], upper=False)[:, 0]
        return s @ self._z

    @property
    def V(self) -> torch.Tensor:  # noqa: N802 - the math's name
        """V [M, k]: the right singular vectors of L B, each with its largest entry positive."""
        return _signed(self._v_all(), self._g_all())[0]

    @property
    def G(self) -> torch.Tensor:  # noqa: N802 - the math's name
        """G = B V [D, k], with V's signs."""
        return _signed(self._v_all(), self._g_all())[1]

    def nmse_on(self, stats: MomentAccumulator) -> torch.Tensor:
        """NMSE at ranks 0..k on other (e.g. held-out) statistics of the same layer: [k + 1]."""
        stats.check("held-out inputs")
        mom = _moments(stats, self.weight, self.bias, self.fit_bias, None if stats.has_targets else self._side.wwt)
        g = self._g_all()
        cg = mom.cxx @ g
        q = (cg * g).sum(0)  # g_i^T C g_i
        if self._same_cross and not stats.has_targets:  # Cxy V = C W V = C G
            cross = q
        else:
            # explicit targets, or not same_cross (no W W^T passed): _moments formed Cxy
            cross = (g * (cast(torch.Tensor, mom.cxy) @ self._v_all())).sum(0)  # g_i^T Cxy v_i
        n = mom.count
        dx = mom.mean_x - self.mean_x
        dy = mom.mean_y - self.mean_y
        a = dx @ g  # [k]
        per_rank = q - 2 * cross + n * (a.square() - 2 * a * self._v_dot(dy))
        zero = per_rank.new_zeros(1)
        return _normalized(mom.syy + n * dy.square().sum() + torch.cat([zero, per_rank.cumsum(0)]), mom.total)

    def smallest_rank(self, max_nmse: float) -> int:
        """The smallest rank >= 1 whose NMSE on the fitted statistics is <= ``max_nmse``."""
        ok = (self.nmse_curve[1:] <= max_nmse).nonzero()
        return int(ok[0].item()) + 1 if len(ok) else self.max_rank

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(Wa [D, rank], Wb [rank, M], bias [M] or None without ``fit_bias``) in float64; Wa's
        columns and Wb's rows carry equal norms, which keeps later gradient training well balanced."""
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank must be in [1, {self.max_rank}], got {rank}")
        v, g = _signed(*self._columns(rank))
        bias = self.mean_y - self.mean_x @ g @ v.T if self.fit_bias else None
        if self.input_map is not None:
            g = self.input_map @ g
        norms = g.norm(dim=0).sqrt().clamp_min(torch.finfo(torch.float64).tiny)
        wa = g / norms
        wb = norms[:, None] * v.T
        return wa, wb, bias

    def dense(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(B [D, M], bias [M] or None without ``fit_bias``): the best full-rank map, float64."""
        bias = self.mean_y - self.mean_x @ self.B if self.fit_bias else None
        return (self.B if self.input_map is None else self.input_map @ self.B), bias


def decompose(
    stats: MomentAccumulator,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    regularization: float = 0.0,
    *,
    fit_bias: bool = True,
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
        fit_bias: True: the factors come with the jointly fitted best bias; False: no bias, the
            exact optimum of sum ||y - x @ Wa @ Wb||^2 (for a layer that has no bias, whose pair
            gets none). The NMSE is that of the map as returned in both cases.
    """
    return LowRankDecomposition(stats, weight, bias, regularization, fit_bias)


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
    if bias is None:
        b = torch.zeros(w.shape[1], dtype=torch.float64, device=dev)
    else:
        b = bias.detach().to(dev, torch.float64)
    tb: Optional[torch.Tensor]
    if target_weight is None:  # the map's own output is the target: only the bias can be off
        tw, tb = w, (b if target_bias is None else target_bias.detach().to(dev, torch.float64))
    else:
        tw = target_weight.detach().to(dev, torch.float64)
        tb = None if target_bias is None else target_bias.detach().to(dev, torch.float64)
    mom = _moments(stats, tw, tb, fit_bias=True)
    cxy = cast(torch.Tensor, mom.cxy)  # no W W^T passed: _moments formed Cxy
    err = (mom.cxx @ w * w).sum() - 2 * (w * cxy).sum() + mom.syy
    err = err + mom.count * (mom.mean_y - mom.mean_x @ w - b).square().sum()
    loss = float(err.clamp_min(0.0))
    denom = float(mom.total)
    return loss / denom if denom > 0 else (0.0 if loss == 0 else 1.0)
