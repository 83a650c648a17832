"""Rebuilding the factorized structure from a state dict, so any loader gets the right model.

Every factorized pair stores ``{"factorize_plugin": kind, "rank": r}`` as its extra state. Before
weights are copied, ``restore_structure`` replaces each dense layer named in such an entry by a
pair of that rank (an existing pair resizes itself in ``set_extra_state``), and turns a pair back
into a dense layer where the state dict holds that layer dense (a checkpoint from before a milestone).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any, Mapping, Optional, Type, TypeVar, Union, cast

import torch
import torch.nn as nn

from ...layers.factorized import (
    EXTRA_STATE_TAG,
    FACTORIZED_PAIRS,
    FactorizedConv2d,
    FactorizedLinear,
    decode_extra_state,
)
from ...layers.transposed import TransposedLinear, conv1d_class
from ..select.modules import set_submodule
from ..select.sharing import alias_names

_SUFFIX = "._extra_state"
_HOOK_FLAG = "_factorize_plugin_loading"


def _placeholder(module: nn.Module, kind: str, rank: int) -> nn.Module:
    """A pair of the right shape for ``module`` (weights are about to be overwritten)."""
    w = cast(torch.Tensor, module.weight)  # a Linear's, Conv1D's or Conv2d's parameter
    pair: Union[FactorizedLinear, FactorizedConv2d]
    if kind == "linear" and isinstance(module, nn.Linear):
        pair = FactorizedLinear(
            module.in_features, module.out_features, rank, module.bias is not None, w.device, w.dtype
        )
    elif kind == "linear" and isinstance(module, TransposedLinear):  # Hugging Face Conv1D: weight [in, out]
        pair = FactorizedLinear(w.shape[0], w.shape[1], rank, module.bias is not None, w.device, w.dtype)
        pair.transposed_from = conv1d_class(type(module))
    elif kind == "conv2d" and isinstance(module, nn.Conv2d):
        pair = FactorizedConv2d(
            module.in_channels, module.out_channels, module.kernel_size, rank, module.stride, module.padding,
            module.dilation, module.padding_mode, module.bias is not None, w.device, w.dtype,
        )
    else:
        raise TypeError(f"the state dict holds a factorized {kind} where the model has a {type(module).__name__}")
    return pair.requires_grad_(w.requires_grad)


def factorized_entries(state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, dict]:
    """Qualified name (relative to ``prefix``) -> extra state, for every factorized pair in it."""
    out = {}
    for key, value in state_dict.items():
        entry = decode_extra_state(value) if key.startswith(prefix) and key.endswith(_SUFFIX) else None
        if entry is not None:
            out[key[len(prefix) : -len(_SUFFIX)]] = entry
    return out


def _dense_in(state_dict: Mapping[str, Any], prefix: str, name: str) -> bool:
    """Whether ``state_dict`` holds layer ``name`` as a plain dense layer (a ``weight`` of its own
    and no factorized extra state)."""
    key = f"{prefix}{name}."
    return key + "weight" in state_dict and key + _SUFFIX[1:] not in state_dict


def restore_structure(model: nn.Module, state_dict: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Gives ``model`` the structure ``state_dict`` holds, before any weight is copied: a dense
    layer becomes a factorized pair wherever the state dict holds one, a pair becomes a dense layer
    again wherever the state dict holds that layer dense (a checkpoint written before a milestone),
    and a pair of another rank resizes itself in ``set_extra_state``. A module reachable under
    several names (``self.b = self.a``) is replaced under all of them by one new module (the state
    dict holds it under each name). Returns the names of the layers replaced here."""
    replaced = []

    def replace(name: str, old: nn.Module, new: nn.Module) -> None:
        for alias in alias_names(model, {name: old})[name]:
            set_submodule(model, alias, new)
        replaced.append(name)

    for name, entry in factorized_entries(state_dict, prefix).items():
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise KeyError(f"the state dict holds a factorized layer '{name}' that the model does not have") from err
        if isinstance(module, FACTORIZED_PAIRS):
            continue  # resizes itself in set_extra_state (an alias of a layer replaced above lands here too)
        replace(name, module, _placeholder(module, entry[EXTRA_STATE_TAG], int(entry["rank"])))
    pairs = [(n, m) for n, m in model.named_modules() if n and isinstance(m, FACTORIZED_PAIRS)]
    for name, pair in pairs:
        if _dense_in(state_dict, prefix, name):
            dense = pair.to_dense()  # its weights are about to be overwritten
            dense_weight = cast(torch.Tensor, dense.weight)  # a Linear's, Conv1D's or Conv2d's parameter
            held = tuple(getattr(state_dict[f"{prefix}{name}.weight"], "shape", ()))
            if held != tuple(dense_weight.shape):
                raise ValueError(
                    f"the state dict holds layer '{name}' dense with a weight of shape {held}, but a "
                    f"{type(dense).__name__} of this pair's sizes has {tuple(dense_weight.shape)} (a layer of another "
                    "type?): load it into a freshly built model instead"
                )
            replace(name, pair, dense)
    return replaced


def _pre_hook(module, state_dict, prefix, *args) -> None:
    restore_structure(module, state_dict, prefix)


def enable_factorized_loading(model: nn.Module) -> nn.Module:
    """Makes ``model.load_state_dict`` rebuild the factorized structure first (idempotent).

    Needed in the main process for ``strategy="ddp_spawn"`` (the workers' weights are copied back
    into this model) and wherever a loader you do not control calls ``load_state_dict``.
    """
    if not getattr(model, _HOOK_FLAG, False):
        model.register_load_state_dict_pre_hook(_pre_hook)
        object.__setattr__(model, _HOOK_FLAG, True)
    return model


def loading_enabled(model: nn.Module) -> bool:
    return bool(getattr(model, _HOOK_FLAG, False))


M = TypeVar("M", bound=nn.Module)


def load_factorized(model: M, state_dict: Union[Mapping[str, Any], str], strict: bool = True) -> M:
    """Loads a (possibly factorized) state dict, or a path to one, into a freshly built model."""
    if not isinstance(state_dict, Mapping):
        state_dict = cast(Mapping[str, Any], torch.load(state_dict, map_location="cpu", weights_only=True))
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]  # a Lightning checkpoint
    restore_structure(model, state_dict)
    model.load_state_dict(state_dict, strict=strict)
    return model


# instantiators Lightning itself trusts in hyperparameters (LightningCLI stores this one)
_TRUSTED_INSTANTIATORS = ("lightning.pytorch.cli.instantiate_module", "pytorch_lightning.cli.instantiate_module")


def _imported_class(class_path: str) -> Optional[type]:
    """The class ``class_path`` names if its module is already imported (nothing is imported here)."""
    module_name, _, name = class_path.rpartition(".")
    module = sys.modules.get(module_name)
    return getattr(module, name, None) if module is not None else None


def _instantiate(cls: Type[M], hparams: dict[str, Any]) -> M:
    """Builds ``cls`` from checkpoint hyperparameters the way ``load_from_checkpoint`` does: through
    the instantiator LightningCLI recorded (``_instantiator`` / ``_class_path``), else ``cls(**hparams)``
    with only the arguments its ``__init__`` takes (unless it takes ``**kwargs``)."""
    hparams = dict(hparams)
    instantiator_path = hparams.pop("_instantiator", None)
    class_path = hparams.get("_class_path")
    if class_path is not None:
        klass = _imported_class(class_path)
        if not (isinstance(klass, type) and issubclass(klass, cls)):
            raise ValueError(
                f"the checkpoint was written by the command line for class {class_path!r}, which is not an already "
                f"imported subclass of {cls.__name__}: import the module that defines it, then load again"
            )
    if instantiator_path is not None:
        if instantiator_path not in _TRUSTED_INSTANTIATORS:
            raise ValueError(
                f"the checkpoint names the instantiator {instantiator_path!r}, which is not one LightningCLI writes: "
                "refusing to run it"
            )
        module_name, _, name = instantiator_path.rpartition(".")
        instantiator = getattr(importlib.import_module(module_name), name)
        return instantiator(cls, hparams)
    if class_path is not None:  # a `_class_path` without instantiator: build that class from the rest
        hparams.pop("_class_path")
        cls = cast(Type[M], _imported_class(class_path))  # checked above: an imported subclass of cls
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        hparams = {k: v for k, v in hparams.items() if k in params and k != "self"}
    return cls(**hparams)


def load_factorized_checkpoint(cls: Type[M], checkpoint_path: str, map_location: Optional[Any] = None, **kwargs) -> M:
    """``cls.load_from_checkpoint`` for a LightningModule whose checkpoint holds factorized layers.

    Builds the module from the checkpoint's hyperparameters as ``load_from_checkpoint`` does (also
    for checkpoints written through ``LightningCLI``, whose hyperparameters carry ``_class_path``;
    ``cls`` may then be a base class such as ``LightningModule``), gives it the structure the
    checkpoint holds (factorized pairs at their ranks, dense layers dense), then loads the weights
    strictly. ``kwargs`` override hyperparameters.
    """
    ckpt = torch.load(checkpoint_path, map_location=map_location or "cpu", weights_only=False)
    hparams = dict(ckpt.get(getattr(cls, "CHECKPOINT_HYPER_PARAMS_KEY", "hyper_parameters"), {}) or {})
    hparams.update(kwargs)
    model = _instantiate(cls, hparams)
    hook = getattr(model, "on_load_checkpoint", None)
    if hook is not None:
        hook(ckpt)
    return load_factorized(model, ckpt["state_dict"], strict=True)
