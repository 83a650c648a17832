"""Naming the layer a failing forward pass died in (a calibration batch that does not fit the model).

PyTorch's own errors (``mat1 and mat2 shapes cannot be multiplied (4x100 and 64x32)``) do not say
which module raised them. ``naming_failures(model)`` tracks which submodules are inside their
forward while the block runs; an exception then gets the innermost one's qualified name, type and
input shapes prepended (same exception type where it can be rebuilt from a message).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn


def _shapes(args: tuple) -> list:
    return [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]


@contextlib.contextmanager
def naming_failures(model: nn.Module, what: str = "the calibration batch") -> Iterator[None]:
    """Re-raises an exception from inside ``model``'s forward naming the innermost module it came from."""
    stack: list[tuple[str, nn.Module, list]] = []
    handles = []
    for name, module in model.named_modules():

        def enter(m, args, name=name):
            stack.append((name, m, _shapes(args)))

        def leave(m, args, out):
            if stack and stack[-1][1] is m:
                stack.pop()

        handles.append(module.register_forward_pre_hook(enter, prepend=True))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    except Exception as err:
        if not stack or stack[-1][0] == "":
            raise
        name, module, shapes = stack[-1]
        message = (
            f"{what} does not fit layer '{name}' ({type(module).__name__}"
            + (f", in_features={module.in_features}" if isinstance(module, nn.Linear) else "")
            + (f", in_channels={module.in_channels}" if isinstance(module, nn.Conv2d) else "")
            + f"): it got input(s) of shape {shapes}: {err}"
        )
        try:
            new = type(err)(message)
        except Exception:  # noqa: BLE001 - an exception type that needs other arguments
            new = RuntimeError(message)
        raise new from err
    finally:
        for h in handles:
            h.remove()
