"""Choosing which layers to factorize: by type, by fnmatch patterns over qualified names, by size."""

from __future__ import annotations

from typing import Optional, Sequence

import torch.nn as nn

from ..layers.adapters import FACTORIZABLE_TYPES, check_factorizable, layer_view
from ..layers.factorized import FACTORIZED_PAIRS
from .modules import match_names


_WILDCARDS = set("*?[")


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Named modules, without the insides of factorized pairs (their ``first``/``second``)."""
    out: dict[str, nn.Module] = {}
    pair_prefixes: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in pair_prefixes):
            continue
        if isinstance(module, FACTORIZED_PAIRS):
            pair_prefixes.append(name + ".")
        out[name] = module
    return out


def select_layers(
    model: nn.Module,
    targets: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    types: Sequence[type] = (nn.Linear, nn.Conv2d),
    min_params: int = 0,
    min_features: int = 0,
) -> dict[str, nn.Module]:
    """The layers to factorize, by qualified name, in the model's order.

    Args:
        targets: fnmatch patterns over qualified module names (``"encoder.*.fc?"``); None: all.
            Every pattern must match some module. A pattern without wildcards names one layer,
            which must then be factorizable.
        exclude: patterns of names to leave alone.
        types: module types to consider (Linear / Conv2d; their factorized pairs always count).
        min_params: skip layers with fewer weights than this.
        min_features: skip layers whose min(D, M) is smaller, with D, M the input and output
            features of the layer's matrix (C_in * k_h * k_w and C_out for a convolution), e.g. a
            classifier head with 10 outputs.

    Raises:
        ValueError: a pattern matches no module. TypeError / NotImplementedError: a layer named
        explicitly cannot be factorized (unsupported type, grouped convolution).
    """
    cands = _candidates(model)
    if targets is not None:
        if isinstance(targets, str):
            targets = [targets]
        for pattern in targets:
            if not match_names(cands, [pattern], None):
                raise ValueError(
                    f"target pattern {pattern!r} matches no module of {type(model).__name__}; module names look like "
                    f"{list(cands)[:6]}"
                )
            if not _WILDCARDS & set(pattern):
                check_factorizable(cands[pattern], pattern)
    names = match_names(cands, targets, exclude)
    allowed = tuple(types) + FACTORIZED_PAIRS
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
    return chosen
