"""Editing a live optimizer when layers are swapped, so that the optimizer and LR-scheduler
objects continue (the schedule does not restart) and untouched parameters keep their state.

What happens to the state of new parameters: a new pair's Adam or SGD state is carried from the
dense layer or the pair it replaces, mapped onto the new factors (``carry.py``); another
optimizer's new parameters start with none (Adam's moments at zero and its step
count at 0, SGD's momentum buffer empty), exactly as if they had been in the optimizer from the
start without receiving a gradient. Their param group (and so learning rate, weight decay,
...) is that of the parameter they stand in for: a factor of a weight goes where the weight was,
the new bias where the old bias was (so a "no weight decay on biases" group keeps its meaning).
``LBFGS`` keeps one flat curvature history over all its parameters: it is cleared at a swap (the
next step is a plain gradient step, as its first one). An optimizer that copies its parameter list
out of ``param_groups`` is refused (``check_parameter_caches``).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch
import torch.nn as nn

from .carry import carried_pair_state

NamedParams = Mapping[str, nn.Parameter]


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer behind a ``LightningOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer


def _counterpart(new_name: str, old: NamedParams) -> Optional[str]:
    """The old parameter a new one stands in for: same relative name (a resized pair), else by
    role (``first.weight`` / ``second.weight`` replace a dense ``weight``, ``second.bias`` its ``bias``)."""
    if new_name in old:
        return new_name
    leaf = new_name.rpartition(".")[2]
    if leaf in old:
        return leaf
    return None


def replace_in_optimizer(optimizer, swaps: Iterable[tuple[NamedParams, NamedParams]]) -> None:
    """For each swapped layer, ``(old named params, new named params)`` relative to the layer.

    Every trainable new parameter takes the place (group and position) of the old parameter it
    stands in for (see the module docstring); the old parameters and their state leave the
    optimizer. A layer the optimizer did not hold stays out of it. The param-group dicts, the
    optimizer and any LR scheduler bound to it stay the same objects.
    """
    opt = unwrap_optimizer(optimizer)
    for old, new in swaps:
        _replace_layer(opt, old, new)
    if isinstance(opt, torch.optim.LBFGS):
        # its curvature history (one flat vector over all parameters) and its cached element count
        # are for the old sizes: it restarts from plain gradient steps, as at its first step
        opt.state.clear()
        opt._numel_cache = None


def _replace_layer(opt: torch.optim.Optimizer, old: NamedParams, new: NamedParams) -> None:
    """One layer's parameters ``old`` replaced by ``new`` in ``opt`` (nothing if it held none)."""
    old_ids = {id(p) for p in old.values()}
    where = {id(p): (g, i) for g, group in enumerate(opt.param_groups)
             for i, p in enumerate(group["params"]) if id(p) in old_ids}  # id(old param) -> (group, position)
    if not where:
        return  # the optimizer never held this layer (e.g. frozen)
    fallback = min(where.values())
    inserts: dict[tuple[int, int], list[nn.Parameter]] = {}
    for name, p in new.items():
        if p.requires_grad:
            partner = _counterpart(name, old)
            slot = where.get(id(old[partner]), fallback) if partner is not None else fallback
            inserts.setdefault(slot, []).append(p)
    new_groups = []
    for g, group in enumerate(opt.param_groups):
        params = []
        for i, p in enumerate(group["params"]):
            params.extend(inserts.get((g, i), []))
            if id(p) not in old_ids:
                params.append(p)
        new_groups.append(params)
    # all computed first: no half-edited optimizer
    carried = carried_pair_state(old, new, opt.state)
    for group, params in zip(opt.param_groups, new_groups, strict=True):
        group["params"][:] = params  # in place: the list object is the one the optimizer knows
    for p in old.values():
        opt.state.pop(p, None)
    inserted = {id(p) for ps in inserts.values() for p in ps}
    opt.state.update({p: st for p, st in carried.items() if id(p) in inserted})


def left_without_state(optimizers: Iterable[Any], modules: Iterable[nn.Module]) -> bool:
    """Whether a parameter of ``modules`` that one of ``optimizers`` holds has no state there after
    a swap (a state that could not be carried, ``carry.py``): its moments start empty, which is
    what the learning-rate re-warm is for."""
    opts = [unwrap_optimizer(o) for o in optimizers]
    held = [(o, {id(p) for g in o.param_groups for p in g["params"]}) for o in opts]
    return any(id(p) in ids and not o.state.get(p) for m in modules for p in m.parameters() for o, ids in held)


def check_parameter_caches(optimizer) -> None:
    """Raises before anything changes if the optimizer keeps its parameters in a list besides its
    ``param_groups`` (a copy, not the group's own list as LBFGS's ``_params`` is): after a swap it
    would go on updating the replaced layers' old parameters and never the new ones."""
    opt = unwrap_optimizer(optimizer)
    group_lists = {id(g["params"]) for g in opt.param_groups}
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    for attr, value in vars(opt).items():
        if attr in ("param_groups", "state", "defaults") or id(value) in group_lists:
            continue
        if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) and id(v) in held for v in value):
            raise ValueError(
                f"{type(opt).__name__} keeps its parameters in `{attr}` besides its param_groups: after a milestone it "
                "would keep updating the replaced layers' old parameters and never the factorized ones. Use an "
                "optimizer that reads its param_groups at every step (SGD, Adam, AdamW, LBFGS, ...)"
            )


class OptimizerEdit:
    """One optimizer's edits during a refactorization, with an undo: ``replace`` (see
    ``replace_in_optimizer``) as often as needed, then ``commit`` or ``undo`` (which puts back every
    param group's parameters and the state as they were when the edit began)."""

    def __init__(self, optimizer) -> None:
        self.optimizer = unwrap_optimizer(optimizer)
        check_parameter_caches(self.optimizer)
        self._params = [list(g["params"]) for g in self.optimizer.param_groups]
        self._state = dict(self.optimizer.state)

    @property
    def params_before(self) -> list[nn.Parameter]:
        """Every parameter the optimizer held when the edit began, in group order."""
        return [p for params in self._params for p in params]

    def replace(self, swaps: Iterable[tuple[NamedParams, NamedParams]]) -> None:
        replace_in_optimizer(self.optimizer, swaps)

    def undo(self) -> None:
        for group, params in zip(self.optimizer.param_groups, self._params, strict=True):
            group["params"][:] = params
        self.optimizer.state.clear()
        self.optimizer.state.update(self._state)
        if isinstance(self.optimizer, torch.optim.LBFGS):
            self.optimizer._numel_cache = None

    def commit(self) -> None:
        self._params, self._state = [], {}


def param_group_names(optimizer, module: nn.Module) -> list[list[str]]:
    """The optimizer's param groups as lists of qualified parameter names (in order). Raises if the
    optimizer holds a parameter that is not the module's (its place could not be restored)."""
    names = {id(p): n for n, p in module.named_parameters()}
    out = []
    for group in unwrap_optimizer(optimizer).param_groups:
        missing = [tuple(p.shape) for p in group["params"] if id(p) not in names]
        if missing:
            raise RuntimeError(
                f"the optimizer holds {len(missing)} parameter(s) of shapes {missing[:3]} that are not the "
                f"{type(module).__name__}'s: their optimizer state could not be matched on resume"
            )
        out.append([names[id(p)] for p in group["params"]])
    return out


def restore_param_group_order(optimizer, groups: list[list[str]], named: dict[str, nn.Parameter]) -> None:
    """Re-orders a freshly built optimizer's groups to the saved name order, so that a saved
    optimizer state loads onto the right tensors. Raises if the parameter sets differ."""
    opt = unwrap_optimizer(optimizer)
    if len(groups) != len(opt.param_groups):
        raise RuntimeError(
            f"the checkpoint's optimizer had {len(groups)} param groups, configure_optimizers built "
            f"{len(opt.param_groups)}: cannot restore the optimizer state"
        )
    for group, saved in zip(opt.param_groups, groups, strict=True):
        current = {id(p) for p in group["params"]}
        try:
            ordered = [named[n] for n in saved]
        except KeyError as err:
            raise RuntimeError(
                f"the checkpoint's optimizer holds parameter {err} that the model does not have"
            ) from err
        if {id(p) for p in ordered} != current or len(ordered) != len(group["params"]):
            raise RuntimeError(
                "configure_optimizers put different parameters in a group than the checkpoint's optimizer held; "
                "cannot restore the optimizer state safely"
            )
        group["params"] = ordered
