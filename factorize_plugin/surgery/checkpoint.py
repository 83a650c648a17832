"""Rebuilding the factorized structure from a state dict, so any loader gets the right model.

Every factorized pair stores ``{"factorize_plugin": kind, "rank": r}`` as its extra state. Before
weights are copied, ``restore_structure`` replaces each dense layer named in such an entry by a
pair of that rank (an existing pair resizes itself in ``set_extra_state``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Type, TypeVar, Union

import torch
import torch.nn as nn

from ..layers.factorized import EXTRA_STATE_TAG, FACTORIZED_PAIRS, FactorizedConv2d, FactorizedLinear
from .modules import set_submodule

_SUFFIX = "._extra_state"
_HOOK_FLAG = "_factorize_plugin_loading"


def _placeholder(module: nn.Module, kind: str, rank: int) -> nn.Module:
    """A pair of the right shape for ``module`` (weights are about to be overwritten)."""
    w = module.weight
    if kind == "linear" and isinstance(module, nn.Linear):
        pair = FactorizedLinear(module.in_features, module.out_features, rank, module.bias is not None, w.device, w.dtype)
    elif kind == "conv2d" and isinstance(module, nn.Conv2d):
        pair = FactorizedConv2d(
            module.in_channels, module.out_channels, module.kernel_size, rank, module.stride, module.padding,
            module.dilation, module.padding_mode, module.bias is not None, w.device, w.dtype,
        )  # fmt: skip
    else:
        raise TypeError(f"the state dict holds a factorized {kind} where the model has a {type(module).__name__}")
    return pair.requires_grad_(w.requires_grad)


def factorized_entries(state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, dict]:
    """Qualified name (relative to ``prefix``) -> extra state, for every factorized pair in it."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(prefix) and key.endswith(_SUFFIX) and isinstance(value, dict) and EXTRA_STATE_TAG in value:
            out[key[len(prefix) : -len(_SUFFIX)]] = value
    return out


def restore_structure(model: nn.Module, state_dict: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Replaces dense layers by factorized pairs wherever ``state_dict`` holds one. Returns their names."""
    replaced = []
    for name, entry in factorized_entries(state_dict, prefix).items():
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise KeyError(f"the state dict holds a factorized layer '{name}' that the model does not have") from err
        if isinstance(module, FACTORIZED_PAIRS):
            continue  # resizes itself in set_extra_state
        set_submodule(model, name, _placeholder(module, entry[EXTRA_STATE_TAG], int(entry["rank"])))
        replaced.append(name)
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
        state_dict = torch.load(state_dict, map_location="cpu", weights_only=True)
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]  # a Lightning checkpoint
    restore_structure(model, state_dict)
    model.load_state_dict(state_dict, strict=strict)
    return model


def load_factorized_checkpoint(cls: Type[M], checkpoint_path: str, map_location: Optional[Any] = None, **kwargs) -> M:
    """``cls.load_from_checkpoint`` for a LightningModule whose checkpoint holds factorized layers.

    Builds the module from the checkpoint's hyperparameters (as ``load_from_checkpoint`` does),
    rebuilds the factorized structure, then loads the weights strictly.
    """
    ckpt = torch.load(checkpoint_path, map_location=map_location or "cpu", weights_only=False)
    hparams = dict(ckpt.get(getattr(cls, "CHECKPOINT_HYPER_PARAMS_KEY", "hyper_parameters"), {}))
    hparams.update(kwargs)
    model = cls(**hparams)
    if hasattr(model, "on_load_checkpoint"):
        model.on_load_checkpoint(ckpt)
    return load_factorized(model, ckpt["state_dict"], strict=True)
