"""A rank policy as plain data and back: ``{"class_path": ..., "init_args": {...}}``.

The same shape as a LightningCLI / jsonargparse ``class_path`` mapping, so that what a checkpoint or
a history records can be pasted into a YAML schedule. It holds the policy's constructor fields only,
never its run state (``ParamBudget.last_plan``), and only types torch's safe ``weights_only``
unpickler loads (numbers, strings, bools, None, lists, dicts).
"""

from __future__ import annotations

import dataclasses
import importlib
import numbers
import sys
from typing import Any, Mapping

from .policies import RankPolicy, as_rank_like

PLAIN_SCALARS = (bool, int, float, str, type(None))


def class_path(cls: type) -> str:
    """``factorize_plugin.Name`` where the package exports the class, else ``module.QualName``."""
    package = sys.modules.get("factorize_plugin")
    if (
        package is not None
        and cls.__module__.startswith("factorize_plugin.")
        and getattr(package, cls.__name__, None) is cls
    ):
        return f"factorize_plugin.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _plain_field(value: Any) -> Any:
    """A field as plain data: numbers as Python numbers, containers element-wise, anything else
    (a user's object) as its repr: a record, never a reason for a checkpoint not to load."""
    if type(value) in PLAIN_SCALARS:  # exact types: numpy.float64 is a float subclass the safe unpickler refuses
        return value
    value = as_rank_like(value)  # numpy / 0-d tensor numbers
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value) if not isinstance(value, numbers.Integral) else int(value)
    if isinstance(value, Mapping):
        return {str(k): _plain_field(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_field(v) for v in value]
    return repr(value)


def policy_spec(policy: RankPolicy) -> dict[str, Any]:
    """The policy's class path and constructor fields (a dataclass's ``init`` fields; for another
    ``RankPolicy`` its public instance attributes), as plain data."""
    if not isinstance(policy, RankPolicy):
        raise TypeError(f"expected a RankPolicy (FixedRank, MaxNMSE, ParamBudget), got {type(policy).__name__}")
    if dataclasses.is_dataclass(policy):
        fields = {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy) if f.init}
    else:
        fields = {k: v for k, v in vars(policy).items() if not k.startswith("_")}
    return {"class_path": class_path(type(policy)), "init_args": {k: _plain_field(v) for k, v in fields.items()}}


def policy_from_spec(spec: Mapping[str, Any]) -> RankPolicy:
    """Builds the policy a ``policy_spec`` describes. It imports ``class_path``: call it on specs
    you trust (your own checkpoints and configs), as with any ``class_path`` in a YAML file."""
    path = spec.get("class_path") if isinstance(spec, Mapping) else None
    if not isinstance(path, str) or "." not in path:
        raise ValueError(f"a policy spec needs a 'class_path' such as 'factorize_plugin.FixedRank', got {spec!r}")
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, RankPolicy)):
        raise ValueError(
            f"class_path {path!r} does not name a RankPolicy (FixedRank, MaxNMSE, ParamBudget or a subclass)"
        )
    return cls(**dict(spec.get("init_args") or {}))


__all__ = ["class_path", "policy_from_spec", "policy_spec"]
