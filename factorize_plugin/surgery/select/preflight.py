"""Refusals before anything runs, for models the library cannot work on as they are, shared by
``factorize_model`` and the callback: parameters on the meta device (no values to run batches
through or to factorize) and ``torch.compile``'d submodules (their compiled code does not run the
forward hooks that collect each layer's inputs, and tracing those hooks fails inside dynamo).
A compiled *model* is not refused by ``factorize_model``: it works on the module the model wraps
(``uncompiled``), which the compiled model then runs (recompiling on its next call).

Plain PyTorch: no Lightning.
"""

from __future__ import annotations

import itertools
from typing import cast

import torch.nn as nn


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is what ``torch.compile(module)`` returns (dynamo's ``OptimizedModule``)."""
    return type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module)


def uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile``'d model wraps (its ``_orig_mod``, unwrapped repeatedly), else ``model``."""
    while is_compiled(model):
        model = cast(nn.Module, model._orig_mod)  # a Module: is_compiled checks it
    return model


def check_not_compiled(model: nn.Module, who: str) -> None:
    """Raises ValueError naming the first ``torch.compile``'d submodule of ``model``, if any."""
    for name, module in model.named_modules():
        if is_compiled(module):
            shown = name or "the model"
            raise ValueError(
                f"{who}: '{shown}' is a torch.compile'd module: its compiled code does not run the forward hooks "
                "that collect each layer's inputs (and tracing them fails inside dynamo). Factorize the module it "
                f"wraps ('{name + '.' if name else ''}_orig_mod', or build the model without torch.compile) and "
                "compile after factorizing"
            )


def check_not_meta(model: nn.Module, who: str) -> None:
    """Raises ValueError naming the parameters / buffers of ``model`` on the meta device, if any."""
    on_meta = [
        (name, tuple(t.shape))
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
        if t is not None and t.is_meta
    ]
    if on_meta:
        name, shape = on_meta[0]
        more = f" (and {len(on_meta) - 1} more)" if len(on_meta) > 1 else ""
        raise ValueError(
            f"{who}: parameter '{name}' {list(shape)} of {type(model).__name__} is on the meta device{more}: it has "
            "no values to run batches through or to factorize. Materialize the model first (e.g. "
            "model.to_empty(device='cpu') then load_state_dict, or build it outside torch.device('meta'))"
        )
