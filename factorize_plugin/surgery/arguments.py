"""The one vocabulary of the three doors (``LowRankFactorization``, ``FactorizationEngine``,
``factorize_model``): one short help text per argument (the classes' ``Args:`` sections, which
LightningCLI's ``--help`` reads), the defaults that differ on purpose between the training doors and
the one-shot call (with why), and the old names that still work for one release.

The full reference of each argument is ``docs/callback.md``; ``docs/arguments.md`` sets the doors'
arguments side by side."""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any, TypeVar

HELP: dict[str, str] = {
    "schedule": "{epoch: value} (with interval='step': {optimizer step: value}); a value is a RankPolicy "
    "(FixedRank(16), MaxNMSE(0.05), ParamBudget(0.3)) or a scalar read by mode; progressive(target, keys) "
    "reaches target in equal-ratio steps; 'auto' or Auto(target, readiness) (callback only) switches once to "
    "target when the layers' stable ranks settle. From a milestone on, the layers run at the new rank, fitted to "
    "the inputs of the evaluation just before it.",
    "mode": "how scalar schedule values are read: 'rank' (an int rank, or a float in (0, 1) = fraction of each "
    "layer's min(in, out)), 'max_nmse' (per layer, the smallest rank within that NMSE) or 'param_budget' "
    "(that fraction of the targeted layers' dense weights in total).",
    "targets": "which layers: fnmatch patterns over qualified module names (a string is one pattern), or "
    "Targets(include, exclude, min_params=1024, min_features=32); default: every Linear and Conv2d with at least "
    "1024 weights and 32 features. Each pattern must match some module.",
    "statistics": "how each layer's inputs are summarized: Statistics(max_samples, sample_fraction, max_bytes, "
    "space); default: the door's rows (training: at most 100,000 per layer, sample_fraction='auto'; one-shot: "
    "200,000, every row), one pass, space='auto'.",
    "budget_batches": "evaluation batches on which a ParamBudget measures each layer's effect on the network's "
    "output; 0 allocates by the layers' NMSE alone (factorize_model: None, all calibration batches).",
    "input_fn": "turns an evaluation batch into the model's input (default: a tuple/list batch's first element, "
    "a dict as keyword arguments, else the batch).",
    "regularization": ">= 0; moves the fit toward the plain SVD of the weights (few samples).",
    "name": "distinguishes two instances in a checkpoint (their state_key).",
    "verbose": "print a summary table after each milestone.",
    "speed_guard": "'auto' (default: on, off under FSDP2), True (time the whole training step with today's "
    "structure and the candidate one; keep only what makes it 1.15x as fast), a SpeedGuard, or False (no "
    "timing: the same structure on every machine).",
    "output_batches": "evaluation batches run before and after each swap to log factorize/output_nmse (how much "
    "the network's output moved); 0 switches it off.",
    "rewarm_steps": "after a swap mid-training, the learning rate ramps from 1/n to 1 of its scheduled value over "
    "n optimizer steps; 'auto' (default): a quarter of an epoch's steps, at most 1000, and only where the swap "
    "left optimizer moments empty (Adam's and SGD's are carried onto the new factors); 0: none.",
    "interval": "what the schedule's keys count: 'epoch' (default) or 'step' (optimizer steps, for runs of an "
    "epoch or less).",
}


@dataclasses.dataclass(frozen=True)
class Default:
    """An argument's default at the training doors (the callback and the engine) and at the one-shot
    call, and why they differ."""

    training: Any
    one_shot: Any
    why: str


DEFAULTS: dict[str, Default] = {
    "max_samples": Default(100_000, 200_000, "statistics are collected at every milestone during training, on an "
                           "evaluation set that may be large; a calibration set is read once"),
    "sample_fraction": Default("auto", 1.0, "the same: training subsamples rows to keep collection near 5% of a "
                               "forward; one-shot keeps every row"),
    "budget_batches": Default(4, None, "a milestone measures on a few evaluation batches; one-shot on all the "
                              "calibration batches it was given"),
}  # fmt: skip

# Same name, same meaning at every door, what is measured follows the door: ``speed_guard`` keeps a
# change only where what the door runs gets measurably faster. The training doors run training (the
# whole training step by default), ``factorize_model`` produces a model for inference (each layer's
# forward alone); ``SpeedGuard(mode=..., scope=...)`` names the measurement explicitly at any door.
RENAMED: dict[str, str] = {"sensitivity_batches": "budget_batches"}  # old name -> new name, until the next release

# Old flat arguments -> (the object now holding them, its field), until the next release.
MOVED: dict[str, tuple[str, str]] = {
    "exclude": ("Targets", "exclude"),
    "min_params": ("Targets", "min_params"),
    "min_features": ("Targets", "min_features"),
    "max_samples": ("Statistics", "max_samples"),
    "sample_fraction": ("Statistics", "sample_fraction"),
    "max_statistics_bytes": ("Statistics", "max_bytes"),
    "space": ("Statistics", "space"),
    "target": ("Auto", "target"),
    "readiness": ("Auto", "readiness"),
}
DOOR_ARGUMENT = {"Targets": "targets", "Statistics": "statistics", "Auto": "schedule"}  # where each object goes
HELP.update({old: f"deprecated (goes in the next release): pass {DOOR_ARGUMENT[cls]}={cls}({field}=...)."
             for old, (cls, field) in MOVED.items()})  # fmt: skip


def moved(where: str, given: dict[str, Any]) -> None:
    """A ``DeprecationWarning`` per old flat argument in ``given`` (``MOVED``), saying where it went."""
    for old in given:
        cls, field = MOVED[old]
        warnings.warn(f"{where}: {old}= is deprecated (it goes in the next release): pass "
                      f"{DOOR_ARGUMENT[cls]}={cls}({field}=...)", DeprecationWarning, stacklevel=4)  # fmt: skip


def renamed(old: str, old_value: Any, new_value: Any, where: str) -> Any:
    """The value of the argument now called ``RENAMED[old]``, given under ``old`` (a
    ``DeprecationWarning``) or under its new name; both at once is refused."""
    if old_value is None:
        return new_value
    new = RENAMED[old]
    if new_value is not None:
        raise ValueError(f"{where}: {old}= is the old name of {new}=; pass only {new}=")
    warnings.warn(f"{where}: {old}= is renamed {new}= (the old name goes in the next release)", DeprecationWarning,
                  stacklevel=3)  # fmt: skip
    return old_value


def default(name: str, door: str) -> Any:
    """``DEFAULTS[name]`` at ``door`` (``"training"`` or ``"one_shot"``)."""
    return getattr(DEFAULTS[name], door)


T = TypeVar("T", bound=type)


def with_argument_help(cls: T) -> T:
    """Class decorator: appends a Google-style ``Args:`` block for the parameters of ``cls.__init__``
    (in their order) to the class docstring."""
    names = list(inspect.signature(cls).parameters)
    cls.__doc__ = (cls.__doc__ or "") + "\n    Args:\n" + "".join(f"        {n}: {HELP[n]}\n" for n in names)
    return cls


__all__ = [
    "DEFAULTS", "DOOR_ARGUMENT", "HELP", "MOVED", "RENAMED", "Default", "default", "moved", "renamed",
    "with_argument_help",
]
