"""Loading a Hugging Face model saved with factorized layers back, factorized.

``model.save_pretrained(path)`` works on a model with factorized layers: each pair's extra state
(an int64 tensor: kind and rank) is saved with its weights. Loading needs this module, because
``from_pretrained`` builds the dense model and does not know the pairs:

    model = load_factorized_pretrained(GPT2LMHeadModel, path)

Plain ``GPT2LMHeadModel.from_pretrained(path)`` does not raise: it logs a loading report whose
missing keys are the factorized layers' dense weights (left at their random initialization) and
whose unexpected keys are the pairs' ``first`` / ``second`` weights. Do not use it on such a
directory.

``transformers`` and ``safetensors`` are imported only when a function here is called.
"""

from __future__ import annotations

import json
import os
from typing import Any, Type, TypeVar, cast

import torch
import torch.nn as nn

from .checkpoint import factorized_entries, restore_structure

M = TypeVar("M", bound=nn.Module)


def read_pretrained_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``save_pretrained`` directory (one safetensors file or a sharded index)."""
    from safetensors.torch import load_file

    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index):
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path!r}")
    with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    return state


def _tied_keys(model: nn.Module) -> dict[str, set[str]]:
    """Parameter name -> every name of the same tensor (tied weights are saved once)."""
    by_id: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), set()).add(name)
    return {n: names for names in by_id.values() for n in names}


def load_factorized_pretrained(cls: Type[M], path: str, **config_kwargs: Any) -> M:
    """Builds ``cls`` from the directory's config, rebuilds the factorized structure recorded in
    its weights, then loads every weight (strictly, except tied weights saved under one name).

    Returns the model in eval mode, like ``from_pretrained``.

    Raises:
        KeyError: the weights name a layer the model does not have, or the model has weights the
            directory lacks / the directory has weights the model lacks.
    """
    config = cast(Any, cls).config_class.from_pretrained(path, **config_kwargs)  # a transformers PreTrainedModel
    model = cls(config)
    state = read_pretrained_state_dict(path)
    if not factorized_entries(state):
        raise ValueError(f"{path!r} holds no factorized layer: load it with {cls.__name__}.from_pretrained")
    restore_structure(model, state)
    result = model.load_state_dict(state, strict=False)  # tied weights are saved once: checked below
    tied = _tied_keys(model)
    missing = [k for k in result.missing_keys if not (tied.get(k, set()) & state.keys())]
    if missing or result.unexpected_keys:
        raise KeyError(
            f"loading {path!r} into {cls.__name__}: missing keys {missing[:5]}, unexpected keys "
            f"{list(result.unexpected_keys)[:5]}"
        )
    return model.eval()
