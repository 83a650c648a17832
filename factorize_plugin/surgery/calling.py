"""How the library runs a model on a batch, and the one context for doing so outside training.

One rule everywhere (``factorize_model``, the callback, output measurements): ``input_fn(batch)``
gives the model's input, by default ``default_inputs``: the first element of a tuple/list batch
(``(x, y)`` from a labelled loader), a dict batch as it is, anything else as it is. The model is
then called as ``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple (an ``input_fn`` that
returns several arguments), ``model(inputs)`` otherwise.

A batch whose layout ``forward`` cannot take (a dict batch ``{"x": ..., "y": ...}`` for a
``forward(x)``) is a ``BatchLayoutError`` naming ``input_fn=`` and what to pass: ``call_model``
raises it where the call fails, and ``layout_problem`` finds it from ``forward``'s signature
alone, without running the model (the callback checks a validation batch before training).
"""

from __future__ import annotations

import contextlib
import inspect
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


class BatchLayoutError(TypeError):
    """The model's ``forward`` cannot take what the calling rule makes of a batch (the message
    names ``input_fn=`` and what to pass)."""


def call_arguments(x: Any) -> tuple[tuple, dict[str, Any]]:
    """How the model is called on its input ``x``: (positional, keyword) arguments."""
    if isinstance(x, Mapping):
        return (), dict(x)
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(x), {}
    return (x,), {}


def call_model(model: nn.Module, batch: Any, input_fn: Optional[InputFn] = None) -> Any:
    """``model`` on ``x = (input_fn or default_inputs)(batch)``: ``model(**x)`` for a dict,
    ``model(*x)`` for a (non-named) tuple, else ``model(x)``. A call that ``forward``'s signature
    refuses is a ``BatchLayoutError`` saying what to pass as ``input_fn=``."""
    x = (input_fn or default_inputs)(batch)
    args, kwargs = call_arguments(x)
    try:
        return model(*args, **kwargs)
    except TypeError as err:
        problem = _layout_message(model, batch, x, input_fn)
        if problem is None:  # forward took the arguments: the TypeError came from inside it
            raise
        raise BatchLayoutError(problem) from err


def layout_problem(model: nn.Module, batch: Any, input_fn: Optional[InputFn] = None) -> Optional[str]:
    """Why ``call_model(model, batch, input_fn)`` would fail to call ``model.forward`` (the
    message of a ``BatchLayoutError``), read from ``forward``'s signature without running the
    model; None where the signature takes the arguments or cannot be read. An ``input_fn`` that
    raises on the batch is a problem too (it is called; ``default_inputs``'s own errors propagate)."""
    if input_fn is None:
        x = default_inputs(batch)
    else:
        try:
            x = input_fn(batch)
        except Exception as err:  # noqa: BLE001 - the user's function, reported with the batch's layout
            return (
                f"the input_fn= you passed raised {type(err).__name__}: {err} on the batch ({_describe(batch)}); fix "
                "input_fn= so that it returns the model's input (a dict is passed as keyword arguments, a tuple "
                "as positional arguments, anything else as the one argument)"
            )
    return _layout_message(model, batch, x, input_fn)


def _signature(model: nn.Module) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):  # a builtin or an exotic callable: nothing to check against
        return None


def _describe(value: Any) -> str:
    """A short description of a batch or model input: its type and, for a dict, its keys."""
    if isinstance(value, Mapping):
        return f"a dict with keys {list(value)}"
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def _how_called(batch: Any, x: Any, input_fn: Optional[InputFn]) -> str:
    """How the rule turned ``batch`` into the call, in words."""
    args, kwargs = call_arguments(x)
    if isinstance(x, Mapping):
        passed = f"passed as keyword arguments, forward({', '.join(f'{k}=...' for k in kwargs)})"
    elif isinstance(x, tuple) and not hasattr(x, "_fields"):
        passed = f"passed as {len(args)} positional argument{'s' if len(args) != 1 else ''}"
    else:
        passed = "passed as the one argument"
    if input_fn is not None:
        return f"the input_fn= you passed returned {_describe(x)}, {passed}"
    if x is batch:
        return f"the batch, {_describe(batch)}, is {passed}"
    return f"the first element of a {type(batch).__name__} batch, {_describe(x)}, is {passed}"


def _binds(sig: inspect.Signature, args: tuple = (), kwargs: Optional[dict] = None) -> bool:
    try:
        sig.bind(*args, **(kwargs or {}))
        return True
    except TypeError:
        return False


def _suggestion(sig: inspect.Signature, batch: Any, x: Any) -> str:
    """An ``input_fn`` that feeds ``forward`` from the keys of a dict the default rule passed (the
    batch, or its first element), where one that ``forward``'s signature takes can be guessed."""
    if not isinstance(x, Mapping) or not x or not all(isinstance(k, str) for k in x):
        return ""
    where = "batch" if x is batch else "batch[0]"
    taken = [k for k in x if k in sig.parameters]
    if len(taken) == 1 and _binds(sig, (None,)) and next(iter(sig.parameters)) == taken[0]:
        return f"input_fn=lambda batch: {where}[{taken[0]!r}]"
    if taken and _binds(sig, kwargs={k: None for k in taken}):
        return f"input_fn=lambda batch: {{k: {where}[k] for k in {tuple(taken)!r}}}"
    first = next(iter(x))
    if not taken and _binds(sig, (None,)):
        return f"input_fn=lambda batch: {where}[{first!r}] (if {first!r} holds the model's input)"
    return ""


def _layout_message(model: nn.Module, batch: Any, x: Any, input_fn: Optional[InputFn]) -> Optional[str]:
    """The ``BatchLayoutError`` message where ``forward``'s signature refuses the call on ``x``."""
    sig = _signature(model)
    if sig is None:
        return None
    args, kwargs = call_arguments(x)
    try:
        sig.bind(*args, **kwargs)
        return None
    except TypeError as err:
        reason = str(err)
    shown = str(sig) if len(str(sig)) <= 120 else "(" + ", ".join(sig.parameters) + ")"
    suggestion = _suggestion(sig, batch, x) if input_fn is None else ""
    fix = "fix the input_fn= you passed" if input_fn is not None else "pass input_fn="
    how = _how_called(batch, x, input_fn)
    return (
        f"{type(model).__name__}.forward{shown} cannot take the batch as the model is called: {how} "
        f"({reason}). {fix[0].upper() + fix[1:]}: a function of the batch returning the model's input (a dict is "
        "passed as keyword arguments, a tuple as positional arguments, anything else as the one argument)"
        + (f", e.g. {suggestion}" if suggestion else "")
    )


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
