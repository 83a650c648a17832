"""The one refactorization step, shared by ``factorize_model`` and the Lightning callback.

``refactorize`` takes a model, the chosen layers with their collected statistics and a rank
policy, and in one transaction: solves every layer exactly, lets the policy choose the ranks
(judging on the network's output where it is given a probe), lets the processes agree on them,
swaps every layer all-or-nothing, edits the optimizers in place, and returns one report per
layer. If anything fails before it returns, the model and the optimizers are as they were.
Plain PyTorch: no Lightning.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union, cast

import torch.nn as nn

from ...core.solver import decompose
from ...core.statistics import MomentAccumulator
from ...layers.adapters import install_factors, layer_view, weight_matrix
from ...layers.factorized import FACTORIZED_PAIRS, FactorizedConv2d, FactorizedLinear
from ...layers.sharded import is_unit, rediscover_units
from ..calling import evaluating
from ..ranks.candidates import LayerCandidate
from ..ranks.policies import RankPolicy
from ..ranks.sensitivity import OutputProbe
from ..report.reports import LayerReport
from ..select.modules import set_submodule
from ..select.sharing import alias_names, check_optimizer
from ..statistics.holdout import Halves, heldout_curve
from ..statistics.sharding import Sharding, SharedSolution, gather_solutions, share_factors
from ..timing.model_speed import ModelSpeedCheck
from ..timing.speed import SpeedCheck, SpeedVerdict
from .optim import OptimizerEdit

Ranks = dict[str, Optional[int]]
Progress = Callable[[int, int, str], None]


def build_candidates(
    layers: Mapping[str, nn.Module],
    stats: Mapping[str, MomentAccumulator],
    positions: Optional[Mapping[str, float]] = None,
    regularization: float = 0.0,
    progress: Optional[Progress] = None,
    holdout: Optional[Mapping[str, Halves]] = None,
    sharding: Optional[Sharding] = None,
) -> dict[str, LayerCandidate]:
    """Solves every layer exactly (all ranks at once). Errors name the layer. With ``holdout``
    (name -> two halves of a small set's rows) also a held-out NMSE curve (one more solve).

    With ``sharding`` (``sharding.owners`` set, statistics reduced to their owners) this process
    solves only the layers it owns, and every candidate's decomposition is a ``SharedSolution``
    (the gathered NMSE curve; factors once ``share_factors`` ran); no held-out curves."""
    out, solved = {}, {}
    start, start_cpu = time.perf_counter(), time.process_time()
    failure = None  # sharded: an owner's error, handed to every process so that all of them raise alike
    for i, (name, module) in enumerate(layers.items()):
        mine = sharding is None or sharding.owns(name)
        # an FSDP2 unit's weight is gathered by a collective: every process reads every layer
        matrix = weight_matrix(module) if (mine and failure is None) or is_unit(module) else None
        if not mine or failure is not None:
            continue
        if progress is not None:
            progress(i, len(layers), name)
        try:
            stats[name].check(f"inputs of layer '{name}'")
            w, b = cast(tuple, matrix)
            dec = decompose(stats[name], w, b, regularization, fit_bias=b is not None)  # no bias: the pair gets none
            heldout = None if sharding is not None else heldout_curve((holdout or {}).get(name), w, b, solved=dec)
        except ValueError as err:
            if sharding is None:
                raise ValueError(f"cannot factorize layer '{name}': {err}") from err
            failure = f"cannot factorize layer '{name}': {err}"
            continue
        if sharding is not None:
            solved[name] = (dec, stats[name].num_samples, *w.shape)
            continue
        out[name] = LayerCandidate(
            layer_view(module), dec, float((positions or {}).get(name, 1.0)), samples=stats[name].num_samples,
            heldout_curve=heldout,
        )
    if sharding is None:
        return out
    sharding.solved, sharding.solve_seconds = list(solved), time.perf_counter() - start
    sharding.solve_cpu_seconds = time.process_time() - start_cpu
    shared = gather_solutions(solved, {n: sharding.owners[n] for n in layers}, sharding, failure)
    return {
        name: LayerCandidate(layer_view(module), shared[name][0], float((positions or {}).get(name, 1.0)),
                             samples=shared[name][1])
        for name, module in layers.items()
    }


def _swap(
    model: nn.Module, layers: Mapping[str, nn.Module], candidates: Mapping[str, LayerCandidate],
    ranks: Mapping[str, Optional[int]],
) -> Callable[[], None]:
    """Installs the chosen ranks (None: unchanged) and returns what undoes it; on an error during
    the swap every layer is put back as it was before raising."""
    snapshots = {name: m.snapshot() for name, m in layers.items() if isinstance(m, FACTORIZED_PAIRS)}
    aliases = alias_names(model, layers)  # one module under several names is swapped under all of them

    def undo() -> None:
        for name, module in layers.items():
            for alias in aliases[name]:
                if model.get_submodule(alias) is not module:
                    set_submodule(model, alias, module)
            if name in snapshots:  # a pair: snapshots holds only those
                cast(Union[FactorizedLinear, FactorizedConv2d], module).restore(snapshots[name])
        rediscover_units(model)

    try:
        for name, module in layers.items():
            rank = ranks.get(name)
            if rank is None:
                continue
            new = install_factors(module, *candidates[name].decomposition.factors(rank))
            if new is not module:
                for alias in aliases[name]:
                    set_submodule(model, alias, new)
        rediscover_units(model)  # FSDP2: the root finds the new units at its next forward
    except BaseException:
        undo()
        raise
    return undo


def _reports(
    layers: Mapping[str, nn.Module], candidates: Mapping[str, LayerCandidate], ranks: Ranks
) -> list[LayerReport]:
    out = []
    for name, module in layers.items():
        c, rank = candidates[name], ranks.get(name)
        new_rank = c.view.rank if rank is None else rank
        nmse = 0.0 if rank is None else float(c.decomposition.nmse_curve[rank])
        out.append(LayerReport.of(name, type(module).__name__, c.view, new_rank, nmse, c.positions, c.samples))
        if rank is not None and c.heldout_curve is not None:
            out[-1].heldout_nmse = float(c.heldout_curve[rank])
    return out


def apply_ranks(
    model: nn.Module, layers: Mapping[str, nn.Module], candidates: Mapping[str, LayerCandidate], ranks: Ranks
) -> list[LayerReport]:
    """Installs ``ranks`` (None: unchanged) from solved ``candidates``, all or nothing, and reports;
    no optimizer is touched. The swap step of ``refactorize``, for experiments with given ranks."""
    _swap(model, layers, candidates, ranks)
    return _reports(layers, candidates, ranks)


def refactorize(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    stats: Optional[Mapping[str, MomentAccumulator]],
    policy: RankPolicy,
    *,
    positions: Optional[Mapping[str, float]] = None,
    optimizers: Sequence[Any] = (),
    probe: Optional[OutputProbe] = None,
    agree: Optional[Callable[[Ranks], Ranks]] = None,
    regularization: float = 0.0,
    progress: Optional[Progress] = None,
    speed: Optional[Union[SpeedCheck, ModelSpeedCheck]] = None,
    holdout: Optional[Mapping[str, Halves]] = None,
    sharding: Optional[Sharding] = None,
    candidates: Optional[Mapping[str, LayerCandidate]] = None,
) -> list[LayerReport]:
    """Re-factorizes ``layers`` (qualified name -> module of ``model``) from their input ``stats``.

    Args:
        positions: output positions per sample of each layer (``ActivationCollector.positions``),
            for multiply-add counts.
        optimizers: edited in place (``optim.OptimizerEdit``): each new parameter takes the group and
            place of the one it replaces; Adam's or SGD's state is carried onto the new factors
            (``carry.py``), another optimizer's starts empty; the optimizer objects (and
            any LR scheduler bound to them) continue.
        probe: lets the policy judge its choices on the network's output (``ParamBudget``); the
            model runs in eval mode and without grad meanwhile, and every submodule's mode is restored.
        agree: called with the chosen ranks, returns the ranks every process installs (e.g. a
            broadcast from rank 0 under DDP); must be called by every process.
        regularization: the solver's alpha >= 0 (see ``core.decompose``).
        progress: called as ``progress(i, n, name)`` before each layer is solved.
        holdout: name -> two disjoint halves of the layer's rows (``ActivationCollector.holdout.pairs()``):
            each report then also carries ``heldout_nmse`` (a fit on one half measured on the other).
        speed: a speed guard bound to this call (``speed.SpeedCheck``): a policy that respects rank
            caps (``ParamBudget``) chooses only among ranks it allows; after ``agree`` every
            changing layer is timed at its rank and stays as it is unless its pair is fast enough
            (the report's ``note`` says why; its ``speedup`` holds the measured ratio). A
            ``model_speed.ModelSpeedCheck`` instead times the model's whole training step with the
            candidates installed (through this call's swap, undone after each timing) and drops
            those saving the fewest multiply-adds until it is fast enough (no per-layer caps).
        sharding: under DDP, with ``stats`` reduced to each layer's owner (``sharding.owners``;
            ``ActivationCollector.reduce_to_owners_``): each process solves only its layers, the
            NMSE curves are gathered, and after ``agree`` the factors at the agreed ranks are
            broadcast from their owners (``surgery/statistics/sharding.py``). Needs ``agree`` and no
            ``probe`` (a probe runs the model with trial ranks, whose factors every process
            would need: use all-reduced statistics without ``sharding`` for it) and no ``holdout``.
        candidates: the layers already solved (``build_candidates``, e.g. pass by pass:
            ``passes.collect_in_passes``): ``stats`` (None), ``positions``, ``regularization``,
            ``progress`` and ``holdout`` are then not used.

    Returns:
        One ``LayerReport`` per layer, in the order of ``layers``.
    """
    if sharding is not None and (probe is not None or agree is None):
        raise ValueError("a sharded solve needs agree= (the processes' agreement on the ranks) and no probe=")
    if candidates is None:
        given = cast(Mapping[str, MomentAccumulator], stats)  # no candidates: stats given (see Args)
        candidates = build_candidates(layers, given, positions, regularization, progress, holdout, sharding)
    else:
        missing = [n for n in layers if n not in candidates]
        if missing:
            raise ValueError(f"no solved candidate for layer(s) {missing}")
        candidates = {n: candidates[n] for n in layers}
    ranks = _choose(model, layers, candidates, policy, probe, agree, speed)
    if sharding is not None:  # every process gets the owners' factors at the agreed ranks
        share_factors({n: c.decomposition for n, c in candidates.items()
                       if isinstance(c.decomposition, SharedSolution)}, ranks, sharding)
    verdicts: dict[str, SpeedVerdict] = {}
    if speed is not None:
        ranks, verdicts = speed.check(layers, candidates, ranks, install=lambda r: _swap(model, layers, candidates, r))
    _install(model, layers, candidates, ranks, optimizers)
    reports = _reports(layers, candidates, ranks)
    for r in reports:
        if r.name in verdicts:
            v = verdicts[r.name]
            r.note = r.note or v.note
            r.dense_seconds, r.pair_seconds, r.measured_rank = v.dense_seconds, v.pair_seconds, v.rank
    return reports


def _choose(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    candidates: dict[str, LayerCandidate],
    policy: RankPolicy,
    probe: Optional[OutputProbe],
    agree: Optional[Callable[[Ranks], Ranks]],
    speed: Optional[Union[SpeedCheck, ModelSpeedCheck]],
) -> Ranks:
    """The policy's ranks (within the speed guard's caps where it respects them; judged on the
    network's output with a probe, in eval mode), agreed between the processes."""
    if speed is not None and policy.uses_rank_caps:
        for name, cap in speed.caps(layers, candidates).items():
            candidates[name].rank_cap = cap
    if probe is not None:
        with evaluating(model):
            ranks = policy.choose(candidates, probe)
    else:
        ranks = policy.choose(candidates)
    return agree(ranks) if agree is not None else ranks


def _install(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    candidates: Mapping[str, LayerCandidate],
    ranks: Ranks,
    optimizers: Sequence[Any],
) -> None:
    """Swaps the layers to ``ranks`` and edits the optimizers, all or nothing."""
    old_params = {name: dict(m.named_parameters()) for name, m in layers.items()}
    edits = [OptimizerEdit(opt) for opt in optimizers]
    undo = _swap(model, layers, candidates, ranks)
    try:
        swaps = []
        for name in layers:
            new = dict(model.get_submodule(name).named_parameters())
            if [id(p) for p in new.values()] != [id(p) for p in old_params[name].values()]:
                swaps.append((old_params[name], new))
        for edit in edits:
            edit.replace(swaps)
            check_optimizer(edit.optimizer, edit.params_before, swaps)
    except BaseException:
        for edit in edits:
            edit.undo()
        undo()
        raise
    for edit in edits:
        edit.commit()
