"""Is the candidate at least ``margin`` times as fast as today's structure? Decided from timings
that a busy machine makes noisy.

One median of a few timings decides badly near the margin: the same model, timed twice, lands
once above and once below. ``compare`` times the two structures in alternation (round ``i`` runs
one sample of each, the order flipping every round, so a slow drift of the machine hits both
alike), takes each round's ratio ``base seconds / candidate seconds``, and stops as soon as a
distribution-free confidence interval on the median ratio lies wholly above the margin
("faster") or wholly below it ("slower"), or when ``max_rounds`` or the time ``budget`` is
spent ("undecided"). The fixed rule for an undecided comparison: today's structure stays, so
a timing that cannot tell keeps the run as it is. On the CPU with one intra-op thread a step is
read in this thread's CPU time (``step_clock``): other processes that preempt this one then
inflate neither structure's samples.

The interval comes from order statistics: with ``n`` rounds the median's interval at level
``c`` is ``[x_(k), x_(n+1-k)]`` for the largest ``k`` with ``P(Binomial(n, 1/2) < k) <=
(1 - c) / 2``. It assumes nothing about the noise's shape (a load spike is one outlier, not a
wider Gaussian), and needs ``rounds_needed(c)`` rounds before it exists (6 at 0.95: every one of
them on the same side of the margin).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Optional

import torch

FASTER, SLOWER, UNDECIDED = "faster", "slower", "undecided"


@dataclasses.dataclass
class Comparison:
    """The outcome of comparing a candidate structure's timings with today's.

    ``ratio``: median over rounds of today's seconds / the candidate's (a speedup); ``low`` /
    ``high``: its confidence interval (equal to ``ratio`` for an exact clock); ``rounds``: paired
    timings taken; ``verdict``: ``"faster"`` (``low >= margin``), ``"slower"`` (``high <
    margin``) or ``"undecided"`` (neither before the budget ran out: today's structure stays).
    """

    ratio: float
    low: float
    high: float
    rounds: int
    verdict: str
    base_seconds: float  # median seconds per step of today's structure
    candidate_seconds: float

    @property
    def passes(self) -> bool:
        """Whether the candidate is applied: only a comparison decided "faster" is."""
        return self.verdict == FASTER

    @classmethod
    def exact(cls, base_seconds: float, candidate_seconds: float, margin: float) -> "Comparison":
        """One deterministic timing of each (an injected clock): the ratio decides alone."""
        ratio = base_seconds / candidate_seconds
        return cls(ratio, ratio, ratio, 1, FASTER if ratio >= margin else SLOWER, base_seconds, candidate_seconds)

    def describe(self) -> str:
        """E.g. ``1.37x (1.31-1.42, 6 rounds)``."""
        if self.rounds <= 1 and self.low == self.high:
            return f"{self.ratio:.2f}x"
        return f"{self.ratio:.2f}x ({self.low:.2f}-{self.high:.2f}, {self.rounds} rounds)"


def step_clock(on_gpu: bool) -> Callable[[], float]:
    """The clock a timed step is read with: on the CPU with one intra-op thread, this thread's CPU
    time, which other processes preempting this one do not inflate (the step's wall-clock time on
    an idle machine); otherwise (a GPU, or several CPU threads, whose wall-clock time is what the
    run pays) ``time.perf_counter``."""
    return time.thread_time if not on_gpu and torch.get_num_threads() == 1 else time.perf_counter


def seconds_per_step(
    step: Callable[[], None], sync: Callable[[], None], min_time: float, count: int = 0, cap: int = 1000,
    now: Callable[[], float] = time.perf_counter,
) -> tuple[float, int]:
    """One timed sample: seconds per ``step()`` over ``count`` steps by ``now`` (``sync()`` around
    them, e.g. CUDA), and the count. ``count=0`` first times one step to pick a count lasting
    ``min_time``."""
    if count <= 0:
        sync()
        t0 = now()
        step()
        sync()
        count = max(1, min(cap, math.ceil(min_time / max(now() - t0, 1e-7))))
    sync()
    t0 = now()
    for _ in range(count):
        step()
    sync()
    return (now() - t0) / count, count


def median_interval(values: list[float], confidence: float) -> Optional[tuple[float, float]]:
    """The distribution-free interval on the median of ``values`` at ``confidence``, None when
    there are too few values for one."""
    n = len(values)
    alpha = (1.0 - confidence) / 2.0
    k, tail = 0, 0.0
    while k < n // 2:
        tail_next = tail + math.comb(n, k) / 2.0**n  # P(X <= k)
        if tail_next > alpha:
            break
        tail, k = tail_next, k + 1
    if k == 0:
        return None
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


def rounds_needed(confidence: float) -> int:
    """The fewest rounds for which ``median_interval`` exists at ``confidence`` (6 at 0.95)."""
    n = 1
    while median_interval([0.0] * n, confidence) is None:
        n += 1
    return n


def compare(
    base: Callable[[], float],
    candidate: Callable[[], float],
    margin: float,
    confidence: float = 0.95,
    max_rounds: int = 60,
    budget: float = 5.0,
    now: Callable[[], float] = time.perf_counter,
) -> Comparison:
    """Times ``base()`` and ``candidate()`` (each returns the seconds per step of one sample) in
    alternating rounds until the median ratio's interval clears ``margin`` one way or the other,
    ``max_rounds`` rounds are taken or ``budget`` seconds have passed (at least
    ``rounds_needed(confidence)`` rounds are always taken, so a slow step still gets a verdict)."""
    start = now()
    needed = rounds_needed(confidence)
    base_secs: list[float] = []
    cand_secs: list[float] = []
    ratios: list[float] = []
    interval: Optional[tuple[float, float]] = None
    verdict = UNDECIDED
    while len(ratios) < max(max_rounds, needed):
        if len(ratios) % 2 == 0:
            b, c = base(), candidate()
        else:
            c, b = candidate(), base()
        if not (math.isfinite(b) and b > 0 and math.isfinite(c) and c > 0):
            bad = b if not (math.isfinite(b) and b > 0) else c
            raise ValueError(f"a timing returned {bad} seconds: expected a positive number")
        base_secs.append(b)
        cand_secs.append(c)
        ratios.append(b / c)
        interval = median_interval(ratios, confidence)
        if interval is not None:
            if interval[0] >= margin:
                verdict = FASTER
                break
            if interval[1] < margin:
                verdict = SLOWER
                break
            if now() - start >= budget:
                break
    low, high = interval if interval is not None else (min(ratios), max(ratios))
    return Comparison(
        statistics.median(ratios), low, high, len(ratios), verdict,
        statistics.median(base_secs), statistics.median(cand_secs),
    )
