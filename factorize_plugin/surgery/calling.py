"""How the library runs a model on a batch, and the one context for doing so outside training.

One rule everywhere (``factorize_model``, the callback, output measurements): ``input_fn(batch)``
gives the model's input, by default ``default_inputs``: the first element of a tuple/list batch
(``(x, y)`` from a labelled loader), a dict batch as it is, anything else as it is. The model is
then called as ``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple (an ``input_fn`` that
returns several arguments), ``model(inputs)`` otherwise.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
import torch.nn as nn

InputFn = Callable[[Any], Any]


def default_inputs(batch: Any) -> Any:
    """The model's input in a batch: ``batch[0]`` of a tuple/list, else the batch itself."""
    if isinstance(batch, (tuple, list)) and not hasattr(batch, "_fields"):
        if not batch:
            raise ValueError("an empty tuple/list batch holds no model input")
        return batch[0]
    return batch


def call_model(model: nn.Module, batch: Any, input_fn: Optional[InputFn] = None) -> Any:
    """``model`` on ``x = (input_fn or default_inputs)(batch)``: ``model(**x)`` for a dict,
    ``model(*x)`` for a (non-named) tuple, else ``model(x)``."""
    x = (input_fn or default_inputs)(batch)
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return model(*x)
    return model(x)


def output_tensor(out: Any) -> torch.Tensor:
    """The tensor to judge a model's output by: the output itself, ``.logits`` / ``["logits"]``,
    else the first tensor of a tuple, list or dict (recursively)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping):
        if isinstance(out.get("logits"), torch.Tensor):
            return out["logits"]
        items: Any = out.values()
    elif isinstance(out, (tuple, list)):
        items = out
    else:
        items = ()
    for item in items:
        with contextlib.suppress(TypeError):
            return output_tensor(item)
    raise TypeError(
        f"cannot find a tensor in the model's output ({type(out).__name__}); "
        "pass output_fn= to say which tensor to judge"
    )


def to_device(batch: Any, device: Optional[torch.device]) -> Any:
    """``batch`` with every tensor in it (tuples, lists, namedtuples, dicts) moved to ``device``."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(b, device) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def model_device(model: nn.Module) -> Optional[torch.device]:
    """The device of the model's first parameter (None for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return None


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no grad inside the block; afterwards every submodule gets back its *own*
    training flag (a frozen BatchNorm kept in eval inside a training model stays in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, training in modes:
            m.training = training
