"""Editing a live optimizer when layers are swapped, so that the optimizer and LR-scheduler
objects continue (the schedule does not restart) and untouched parameters keep their state."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn


def _unwrap(optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer


def replace_in_optimizer(optimizer, swaps: Iterable[tuple[Sequence[nn.Parameter], Sequence[nn.Parameter]]]) -> None:
    """For each (old params, new params) of one layer: the new parameters take the old ones' place
    in the param group that held the layer (at the position of its first old parameter), the old
    ones and their state are dropped. New parameters start with empty state (e.g. Adam moments
    at zero, its step count from 0). A layer the optimizer did not hold stays out of it."""
    opt = _unwrap(optimizer)
    for old, new in swaps:
        old_ids = {id(p) for p in old}
        for group in opt.param_groups:
            positions = [i for i, p in enumerate(group["params"]) if id(p) in old_ids]
            if not positions:
                continue
            kept = [p for p in group["params"] if id(p) not in old_ids]
            at = positions[0]
            group["params"] = kept[:at] + [p for p in new if p.requires_grad] + kept[at:]
            break
        for p in old:
            opt.state.pop(p, None)


def param_group_names(optimizer, module: nn.Module) -> list[list[str]]:
    """The optimizer's param groups as lists of qualified parameter names (in order)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [[names[id(p)] for p in group["params"] if id(p) in names] for group in _unwrap(optimizer).param_groups]


def restore_param_group_order(optimizer, groups: list[list[str]], named: dict[str, nn.Parameter]) -> None:
    """Re-orders a freshly built optimizer's groups to the saved name order, so that a saved
    optimizer state loads onto the right tensors. Raises if the parameter sets differ."""
    opt = _unwrap(optimizer)
    if len(groups) != len(opt.param_groups):
        raise RuntimeError(
            f"the checkpoint's optimizer had {len(groups)} param groups, configure_optimizers built "
            f"{len(opt.param_groups)}: cannot restore the optimizer state"
        )
    for group, saved in zip(opt.param_groups, groups):
        current = {id(p) for p in group["params"]}
        try:
            ordered = [named[n] for n in saved]
        except KeyError as err:
            raise RuntimeError(f"the checkpoint's optimizer holds parameter {err} that the model does not have") from err
        if {id(p) for p in ordered} != current:
            raise RuntimeError(
                "configure_optimizers put different parameters in a group than the checkpoint's optimizer held; "
                "cannot restore the optimizer state safely"
            )
        group["params"] = ordered
