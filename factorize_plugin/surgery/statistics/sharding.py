"""Each layer solved once per job: the statistics of a layer reduced to one owner process, which
solves it; the rest of the job sees only what the rank policy reads and the chosen factors.

Under DDP (issue 23, item 2) at a milestone every accumulator is summed into its owner (a
reduce, in a fixed order; the counts and means, small, are all-reduced); owners are spread so
that the solve work is balanced (``assign_owners``, a deterministic longest-processing-time
greedy on the layers' shapes, the same on every process); each owner solves its layers; the
NMSE curves and sample counts are gathered to every process (float64 [k + 1] per layer), so
every process chooses the same ranks; after the ranks are agreed the factors at the chosen ranks
are broadcast from each layer's owner, so every process installs the same bytes.

Plain PyTorch: the collectives are callables (``Sharding``) the caller builds from its process
group (the Lightning callback, in ``engine/distributed.py``); nothing here imports Lightning.
A policy that runs the model with trial ranks (``ParamBudget`` with an output probe) needs the
factors of those trial ranks on every process: callers use the all-reduce path for it instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import torch

from ...core.solver import LowRankDecomposition

ReduceTo = Callable[[torch.Tensor, int], torch.Tensor]
"""Sums a flat tensor over all processes into process ``owner`` (in place there; returns it)."""
BroadcastFrom = Callable[[torch.Tensor, int], torch.Tensor]
"""Copies process ``owner``'s tensor into every process's tensor of that shape (in place; returns it)."""
AllGather = Callable[[Any], list]
"""Every process's (picklable) object, by process index, on every process."""


@dataclasses.dataclass
class Sharding:
    """The collectives of a process group, and what a milestone's sharded solve recorded.

    rank / world_size: this process and the group's size. all_sum: sums a small flat float64
    tensor over the processes (an all-reduce: counts, means, the shared-input agreement).
    reduce_to / broadcast_from / all_gather: see the type aliases above. device: where broadcast
    factors travel (the backend's device: CPU for gloo, the process's GPU for NCCL).

    Filled in during the milestone: owners (layer name -> process solving it), solved (layers
    this process solved), solve_seconds (its wall time spent solving them) and solve_cpu_seconds
    (the process's CPU time meanwhile: less sensitive to other work on a shared machine), loads (the solve work
    assigned to each process so far: a list shared by the passes of one milestone, so that
    owners are balanced over all of them, not within each).
    """

    rank: int
    world_size: int
    all_sum: Callable[[torch.Tensor], torch.Tensor]
    reduce_to: ReduceTo
    broadcast_from: BroadcastFrom
    all_gather: AllGather
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    owners: dict[str, int] = dataclasses.field(default_factory=dict)
    solved: list[str] = dataclasses.field(default_factory=list)
    solve_seconds: float = 0.0
    solve_cpu_seconds: float = 0.0
    loads: list[float] = dataclasses.field(default_factory=list)

    def owns(self, name: str) -> bool:
        return self.owners[name] == self.rank


def default_group_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed in place over ``torch.distributed``'s default process group (initialized); returns ``t``."""
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def solve_work(in_features: int, out_features: int) -> float:
    """Relative cost of one exact solve from statistics of width D = ``in_features`` for M =
    ``out_features`` outputs (``core.solver``): C W (D^2 M), the Gram of the smaller side and
    its eigendecomposition (k = min(D, M)); with M > D also the Cholesky factor and R S R^T (D^3)."""
    d, m = int(in_features), int(out_features)
    k = min(d, m)
    return float(d * d * m + d * m * k + k**3 + (2 * d**3 if m > d else 0))


def assign_owners(work: Mapping[str, float], world_size: int, loads: Optional[list[float]] = None) -> dict[str, int]:
    """Longest processing time first: each unit (largest work first, ties by name) goes to the
    process with the least work so far (ties: the lowest index). Deterministic from ``work``
    alone, so every process computes the same assignment; the largest load is at most 4/3 of the
    optimum (Graham). ``loads``: the work each process already has (earlier collection passes),
    updated in place."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    load = [] if loads is None else loads
    if len(load) != world_size:  # (a fresh list: no work yet)
        load[:] = [0.0] * world_size
    owners: dict[str, int] = {}
    for name in sorted(work, key=lambda n: (-float(work[n]), n)):
        owner = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = owner
        load[owner] += float(work[name])
    return owners


class SharedSolution:
    """A layer's solution as every process knows it when one process (``owner``) solved it: the
    NMSE curve at ranks 0..k and the factors at the ranks broadcast so far (``share_factors``).
    Stands in for a ``LowRankDecomposition`` wherever policies, the speed guard, the swap and the
    reports read one (``nmse_curve``, ``max_rank``, ``smallest_rank``, ``factors``)."""

    def __init__(
        self, owner: int, nmse_curve: torch.Tensor, in_features: int, out_features: int, fit_bias: bool,
        local: Optional[LowRankDecomposition] = None,
    ) -> None:
        self.owner = owner
        self.nmse_curve = nmse_curve
        self.max_rank = nmse_curve.numel() - 1
        self.in_features, self.out_features, self.fit_bias = in_features, out_features, fit_bias
        self.local = local  # the owner's own solution (None elsewhere)
        self._factors: dict[int, tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = {}

    smallest_rank = LowRankDecomposition.smallest_rank  # reads only nmse_curve and max_rank

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        if rank not in self._factors:
            raise RuntimeError(
                f"the factors at rank {rank} were not shared from the owning process {self.owner} "
                "(share_factors shares those of the agreed ranks only)"
            )
        return self._factors[rank]


def gather_solutions(
    solved: Mapping[str, tuple[LowRankDecomposition, int, int, int]], owners: Mapping[str, int], sharding: Sharding,
    failure: Optional[str] = None,
) -> dict[str, tuple[SharedSolution, int]]:
    """Every layer's ``SharedSolution`` and sample count on every process, from what each owner
    solved here (``solved``: name -> (decomposition, samples, D, M)): one gather of small data.
    ``failure``: this process's error, if solving failed; every process then raises the first one
    (in process order) as a ValueError."""
    mine: dict[str, Any] = {
        name: (dec.nmse_curve.detach().cpu(), samples, d, m, dec.fit_bias)
        for name, (dec, samples, d, m) in solved.items()
    }
    parts = sharding.all_gather({"failure": failure, "solved": mine})
    failures = [p["failure"] for p in parts if p["failure"] is not None]
    if failures:
        raise ValueError(failures[0])
    everyone: dict[str, tuple] = {}
    for part in parts:
        everyone.update(part["solved"])
    out = {}
    for name in owners:
        if name not in everyone:
            continue
        curve, samples, d, m, fit_bias = everyone[name]
        local = solved[name][0] if name in solved else None
        out[name] = (SharedSolution(owners[name], curve, d, m, fit_bias, local), samples)
    return out


def share_factors(
    solutions: Mapping[str, SharedSolution], ranks: Mapping[str, Optional[int]], sharding: Sharding
) -> None:
    """Broadcasts, in name order, the float64 factors (Wa, Wb, bias) of every layer at its chosen
    rank from its owner into every process's ``SharedSolution`` (every process must call it with
    the same ``ranks``)."""
    f64: dict[str, Any] = dict(dtype=torch.float64, device=sharding.device)
    for name in sorted(solutions):
        rank, s = ranks.get(name), solutions[name]
        if rank is None:
            continue
        if s.local is not None:
            fa, fb, fbias = s.local.factors(rank)
            wa, wb = fa.to(**f64).contiguous(), fb.to(**f64).contiguous()
            bias = None if fbias is None else fbias.to(**f64).contiguous()
        else:
            wa, wb = torch.empty(s.in_features, rank, **f64), torch.empty(rank, s.out_features, **f64)
            bias = torch.empty(s.out_features, **f64) if s.fit_bias else None
        for t in (wa, wb, bias):
            if t is not None:
                sharding.broadcast_from(t, s.owner)
        s._factors[rank] = (wa, wb, bias)
