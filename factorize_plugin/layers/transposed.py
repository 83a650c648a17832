"""Transposed linear layers (Hugging Face ``transformers.pytorch_utils.Conv1D``, used by GPT-2):
weight stored [D, M] (in, out), ``y = x @ W + b``. Recognised by duck typing, so that this package
never imports ``transformers``.

``isinstance(module, TransposedLinear)`` is true for an instance of a class named ``Conv1D`` from a
``transformers`` module (or a subclass of one) with a 2-D ``weight`` [nx, nf] and an ``nf``
attribute: the same test wherever the package checks layer types.
"""

from __future__ import annotations

from typing import Optional, cast

import torch.nn as nn


def conv1d_class(cls: type) -> Optional[type]:
    """The ``transformers`` ``Conv1D`` class in ``cls``'s MRO, or None."""
    for k in cls.__mro__:
        if k.__name__ == "Conv1D" and k.__module__.split(".")[0] == "transformers":
            return k
    return None


class _TransposedMeta(type):
    def __instancecheck__(cls, obj: object) -> bool:
        if not isinstance(obj, nn.Module) or conv1d_class(type(obj)) is None:
            return False
        w = getattr(obj, "weight", None)
        return w is not None and getattr(w, "ndim", 0) == 2 and getattr(obj, "nf", None) == w.shape[1]

    def __subclasscheck__(cls, sub: type) -> bool:
        return isinstance(sub, type) and conv1d_class(sub) is not None


class TransposedLinear(metaclass=_TransposedMeta):
    """Type marker for transposed linear layers (see the module docstring); never instantiated."""

    def __new__(cls, *args, **kwargs):
        raise TypeError("TransposedLinear is a type marker for isinstance checks, not a layer")


def plain_forward_class(module: nn.Module) -> Optional[type]:
    """The library class whose computation ``module`` performs (nn.Linear, nn.Conv2d or Conv1D) if
    its class does not override that class's ``forward``; None if it computes something else."""
    cls = type(module)
    bases: list[type[nn.Module]] = [b for b in (nn.Linear, nn.Conv2d) if issubclass(cls, b)]
    conv1d = conv1d_class(cls)
    if conv1d is not None:
        bases.append(cast(type[nn.Module], conv1d))  # a class in the MRO of a Module subclass
    for base in bases:
        if cls.forward is base.forward:
            return base
    return None
