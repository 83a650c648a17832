"""The callback's checks of a fit, kept out of the hooks so that each hook stays a few lines:
refusals before training (callbacks that copy parameters, missing validation data, targets changed
between a run and its resume, a spawn start without factorized loading, a measuring budget on a
module without ``forward``) and warnings about milestones the run will not reach."""

from __future__ import annotations

from typing import Any, Mapping

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

from ..surgery.ranks.policies import RankPolicy
from ..surgery.swap.checkpoint import factorized_entries, loading_enabled
from .lightning_internals import start_method, validation_source_defined

_STATE_FIELDS = {"done", "ranks", "history"}
_PARAM_COPY_CALLBACKS = ("StochasticWeightAveraging", "WeightAveraging", "EMAWeightAveraging", "EMA", "EMACallback")


def check_callbacks(callbacks: list) -> None:
    """Refuses callbacks that keep copies of the parameters (their shapes change at milestones)."""
    copies = [
        type(c).__name__ for c in callbacks if {k.__name__ for k in type(c).__mro__} & set(_PARAM_COPY_CALLBACKS)
    ]
    if copies:
        raise ValueError(
            f"LowRankFactorization cannot run with {copies}: they keep copies of the parameters, whose shapes "
            "change at each milestone. Remove one of the two callbacks."
        )


def check_validation(trainer: Trainer, pl_module: LightningModule) -> None:
    """Raises at setup, before any training, if the fit has no validation batches to collect from.
    """
    problems = []
    if not is_overridden("validation_step", pl_module):
        problems.append(f"{type(pl_module).__name__} defines no validation_step")
    if validation_source_defined(trainer) is False:
        problems.append("the Trainer got no val_dataloaders (and the model / datamodule has no val_dataloader)")
    if trainer.limit_val_batches == 0:
        problems.append("limit_val_batches=0")
    if problems:
        raise RuntimeError(
            "LowRankFactorization needs validation data to fit the factors (each milestone is fitted to the inputs "
            f"the layers see on validation batches), but {'; '.join(problems)}. Give the Trainer a val_dataloader "
            "(or a datamodule with one), define validation_step, and keep limit_val_batches > 0"
        )


def _targets_of(state: Mapping[str, Any]) -> set[str]:
    return set(state.get("targets") or state.get("ranks") or ())


def check_resumed_targets(state_key: str, targets: list[str], checkpoint: Mapping[str, Any]) -> None:
    """Raises (before training) if the targets changed since the run that wrote ``checkpoint`` in
    a way that touches layers that are already factorized in it: a factorized layer left out of the
    targets, or one claimed by a callback state stored under another key (targets/exclude changed)."""
    states = {
        k: v
        for k, v in (checkpoint.get("callbacks") or {}).items()
        if isinstance(v, Mapping) and _STATE_FIELDS <= set(v)
    }
    factorized = set(factorized_entries(checkpoint.get("state_dict") or {}))
    current = set(targets)
    ours = states.get(state_key)
    if ours is not None:
        saved = _targets_of(ours)
        changed = sorted((saved ^ current) & factorized)
        if changed:
            left, joined = sorted((saved - current) & factorized), sorted((current - saved) & factorized)
            raise ValueError(
                f"LowRankFactorization: the targets changed since the checkpoint was written "
                f"(then {sorted(saved)}, now {sorted(current)}), and that touches layers already factorized in it: "
                + "; ".join(
                    s
                    for s in (
                        f"{left} would no longer be managed" if left else "",
                        f"{joined} would join" if joined else "",
                    )
                    if s
                )
                + ". Resume with the targets/exclude of the run that wrote the checkpoint"
            )
        return
    claimed = {k: sorted(_targets_of(v) & current & factorized) for k, v in states.items()}
    claimed = {k: v for k, v in claimed.items() if v}
    if claimed:
        raise ValueError(
            f"LowRankFactorization: the checkpoint holds layers {sorted(set().union(*claimed.values()))}, already "
            f"factorized by a LowRankFactorization whose state is stored under {sorted(claimed)}, but this callback's "
            f"state key is {state_key!r}: its targets/exclude (or name) changed since the checkpoint was written "
            f"(now targets {sorted(current)}). Resume with the targets/exclude of that run, or give both runs the same "
            "name="
        )


def check_start_method(trainer: Trainer, pl_module: LightningModule) -> None:
    """Refuses ``ddp_spawn``-like strategies (they copy the weights back into the main process)
    unless the main process's model can rebuild the factorized structure."""
    method = start_method(trainer.strategy)
    if method is not None and not loading_enabled(pl_module):
        raise RuntimeError(
            f"with strategy='ddp_{method}' Lightning copies the trained weights back into the main process's "
            "model, which stays dense unless it can rebuild the factorized structure: call "
            "factorize_plugin.enable_factorized_loading(model) on the model in the main process before "
            "trainer.fit (or use strategy='ddp')"
        )


def warn_late_milestones(trainer: Trainer, schedule: Mapping[int, Any], done: list[int]) -> None:
    """Warns about milestones that ``max_epochs`` leaves out."""
    if trainer.max_epochs is not None and trainer.max_epochs >= 0:
        late = [e for e in schedule if e >= trainer.max_epochs and e not in done]
        if late:
            rank_zero_warn(
                f"LowRankFactorization: milestone(s) {late} are at or after max_epochs={trainer.max_epochs}: "
                "they will not run"
            )


def warn_late_steps(trainer: Trainer, schedule: Mapping[int, Any], done: list[int]) -> None:
    """With ``interval="step"``: warns about milestones at or after the run's last optimizer step
    (a milestone applies before the training batch that follows its step, and none follows the
    last). The run's length is ``trainer.estimated_stepping_batches`` (``max_steps``, or
    ``max_epochs`` times the epoch's optimizer steps); under manual optimization only ``max_steps``
    counts (its ``training_step`` decides how often the optimizers step)."""
    total: float = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps >= 0 else float("inf")
    if trainer.lightning_module.automatic_optimization:
        try:
            estimate = float(trainer.estimated_stepping_batches)
        except Exception:  # noqa: BLE001 - only a warning depends on it (e.g. an accumulation schedule)
            estimate = float("inf")
        if estimate >= 0:  # -1: a loader without a length and no max_steps
            total = min(total, estimate)
    late = [s for s in schedule if s >= total and s not in done]
    if late:
        rank_zero_warn(
            f"LowRankFactorization: milestone(s) {late} are at or after the run's last optimizer step "
            f"({int(total)}: max_steps={trainer.max_steps}, max_epochs={trainer.max_epochs}): they will not run"
        )


def output_measurable(
    pl_module: LightningModule, policies: Mapping[Any, RankPolicy], budget_batches: int, output_batches: int
) -> bool:
    """Whether the module's output can be measured on a batch (``pl_module(input_fn(batch))``: it
    defines ``forward``); checked at setup. Without ``forward`` (all logic in the steps) a measuring
    ``ParamBudget`` is refused before training; the output-shift metric (only a metric) is skipped
    with a warning (returns False)."""
    if is_overridden("forward", pl_module, parent=LightningModule):
        return True
    name = type(pl_module).__name__
    measuring = sorted(epoch for epoch, policy in policies.items() if policy.uses_probe)
    if measuring and budget_batches > 0:
        raise ValueError(
            f"LowRankFactorization: {name} defines no forward, but the ParamBudget of milestone(s) {measuring} "
            f"measures each layer's effect on the output of {name}(input_fn(batch)) on budget_batches={budget_batches} "
            "validation batches. Define forward (training_step / validation_step can call it), or set "
            "budget_batches=0 to allocate by the layers' NMSE alone"
        )
    if output_batches > 0:
        rank_zero_warn(
            f"LowRankFactorization: {name} defines no forward, so the output shift at each milestone "
            f"(factorize/output_nmse, output_batches={output_batches}) cannot be measured and is skipped. Define "
            "forward to get it, or set output_batches=0 to silence this warning"
        )
    return False
