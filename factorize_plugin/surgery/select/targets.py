"""Choosing which layers to factorize: by type, by fnmatch patterns over qualified names, by size."""

from __future__ import annotations

from typing import Optional, Sequence

import torch.nn as nn

from ...layers.adapters import FACTORIZABLE_TYPES, check_factorizable, layer_view
from ...layers.factorized import FACTORIZED_PAIRS
from ...layers.transposed import TransposedLinear
from .modules import match_names
from .sharing import all_module_names, explicit_targets, is_explicit, primary_names, screen_layers


def select_layers(
    model: nn.Module,
    targets: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    types: Sequence[type] = (nn.Linear, nn.Conv2d),
    min_params: int = 0,
    min_features: int = 0,
    notes: Optional[dict[str, str]] = None,
) -> dict[str, nn.Module]:
    """The layers to factorize, by qualified name, in the model's order.

    Args:
        targets: fnmatch patterns over qualified module names (``"encoder.*.fc?"``); None: all.
            Every pattern must match some module. A pattern without wildcards names one layer,
            which must then be factorizable.
        exclude: patterns of names to leave alone (one that matches nothing is not an error here;
            ``pipeline.prepare`` turns it into a warning, ``advice.unmatched_excludes``).
        types: module types to consider (Linear / Conv2d; their factorized pairs always count).
        min_params: skip layers with fewer weights than this.
        min_features: skip layers whose min(D, M) is smaller, with D, M the input and output
            features of the layer's matrix (C_in * k_h * k_w and C_out for a convolution), e.g. a
            classifier head with 10 outputs.
        notes: if given, filled with ``{name: why}`` for the layers left out because swapping them
            would not be safe (see ``sharing``: weights shared with another module, a parent that
            reads the weight without calling the layer, a subclass with its own forward).

    A module reachable under several names is one layer, selected under its first name (its
    other names match too; ``refactorize`` swaps it under every name). Transformers' ``Conv1D``
    counts as a Linear.

    Raises:
        ValueError: a ``targets`` pattern matches no module. TypeError / NotImplementedError: a layer named
        explicitly cannot be factorized (unsupported type, grouped convolution); ValueError: one
        that is unsafe to swap (the reasons ``notes`` lists).
    """
    cands = all_module_names(model, aliases=False)
    primary = primary_names(model)  # every name, aliases included -> the name in cands
    if targets is not None:
        if isinstance(targets, str):
            targets = [targets]
        for pattern in targets:
            if not match_names(primary, [pattern], None):
                raise ValueError(
                    f"target pattern {pattern!r} matches no module of {type(model).__name__}; module names look like "
                    f"{list(cands)[:6]}"
                )
            if is_explicit(pattern):
                check_factorizable(cands[primary[pattern]], pattern)
    names = list(dict.fromkeys(primary[n] for n in match_names(primary, targets, exclude)))
    allowed = tuple(types) + FACTORIZED_PAIRS + ((TransposedLinear,) if nn.Linear in types else ())
    chosen: dict[str, nn.Module] = {}
    for name in names:
        module = cands[name]
        if not isinstance(module, allowed) or not isinstance(module, FACTORIZABLE_TYPES):
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            continue
        view = layer_view(module)
        if view.params() < min_params or min(view.in_dim, view.out_dim) < min_features:
            continue
        chosen[name] = module
    chosen, skipped = screen_layers(model, chosen, explicit_targets(model, targets))
    if notes is not None:
        notes.update(skipped)
    return chosen
