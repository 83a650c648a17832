"""Resuming an FSDP2-sharded model from a distributed checkpoint written after a milestone.

A distributed checkpoint (``torch.distributed.checkpoint``) is loaded into the live model's own
state dict, so the model must already have the checkpoint's structure: ``restore_sharded_structure``
gives each targeted unit the pair (and rank) the checkpoint holds, read from the shapes of its
tensors (a pair's ``first.weight`` is [rank, D] or [rank, C_in, k_h, k_w]), sharded like the unit
it replaces, with the optimizers pointed at the new parameters. The weights and optimizer state then
load as usual. Plain PyTorch: no Lightning.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch.nn as nn

from ...layers.factorized import FACTORIZED_PAIRS
from ...layers.sharded import is_unit, rediscover_units, shard_like
from ..select.modules import set_submodule
from ..select.sharing import alias_names
from .checkpoint import _placeholder
from .optim import OptimizerEdit

_FIRST = ".first.weight"


def pairs_in(shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[str, int]]:
    """Qualified layer name -> (kind, rank) of every factorized pair among tensors ``shapes``
    (state-dict key -> shape): a ``<name>.first.weight`` with a ``<name>._extra_state``."""
    out = {}
    for key, shape in shapes.items():
        name = key[: -len(_FIRST)]
        if key.endswith(_FIRST) and f"{name}._extra_state" in shapes:
            out[name] = ("linear" if len(shape) == 2 else "conv2d", int(shape[0]))
    return out


def restore_sharded_structure(
    model: nn.Module, shapes: Mapping[str, Sequence[int]], optimizers: Sequence[Any] = ()
) -> list[str]:
    """Gives every FSDP2 unit of ``model`` named as a pair in ``shapes`` (a checkpoint's state-dict
    key -> shape) a pair of the checkpoint's rank, sharded like it, and edits ``optimizers`` in
    place (each new parameter takes its predecessor's group and place, with empty state, which the
    checkpoint then fills). A collective: every process calls it alike. Returns the names replaced.

    Raises:
        ValueError: a layer the checkpoint holds as a pair is not its own unit, or one it holds
            dense is a pair here (resume into a freshly built model).
    """
    swaps, replaced = [], []
    for name, (kind, rank) in pairs_in(shapes).items():
        module = model.get_submodule(name)
        if isinstance(module, FACTORIZED_PAIRS) and module.rank == rank:
            continue
        if not is_unit(module):
            raise ValueError(
                f"the checkpoint holds layer '{name}' as a factorized pair, but it is not its own fully_shard unit "
                "here: shard it alone in configure_model, as in the run that wrote the checkpoint"
            )
        new = module.resized(rank) if isinstance(module, FACTORIZED_PAIRS) else _placeholder(module, kind, rank)
        shard_like(new, module)
        swaps.append((dict(module.named_parameters()), dict(new.named_parameters())))
        for alias in alias_names(model, {name: module})[name]:
            set_submodule(model, alias, new)
        replaced.append(name)
    dense_pairs = [n for n, m in model.named_modules() if isinstance(m, FACTORIZED_PAIRS) and f"{n}.weight" in shapes]
    if dense_pairs:
        raise ValueError(
            f"the checkpoint holds layer(s) {dense_pairs} dense, but they are factorized pairs in this model: resume "
            "into a freshly built model"
        )
    if replaced:
        rediscover_units(model)
        for optimizer in optimizers:
            edit = OptimizerEdit(optimizer)
            edit.replace(swaps)
            edit.commit()
    return replaced


__all__ = ["pairs_in", "restore_sharded_structure"]
