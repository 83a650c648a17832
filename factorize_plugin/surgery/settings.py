"""One checker per user setting, shared by every entry point that takes it.

The callback (``LowRankFactorization``), ``factorize_model`` and the rank policies call these
where they are built, so that a bad value fails before any training or calibration, with the same
message everywhere: a ``ValueError`` naming the setting, the value and the rule. Each checker
returns the value normalized (a whole float as an int, one pattern as a list of one, ...).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..core.checks import is_real  # the one test of "a number": NumPy scalars of any width, no bool


def refuse(name: str, value: Any, rule: str, fix: str = "") -> ValueError:
    """The error for ``name=value`` breaking ``rule`` ("must be ..."), with what to do, if said."""
    return ValueError(f"{name} must be {rule}, got {value!r}" + (f": {fix}" if fix else ""))


_is_real = is_real  # the name this module's checkers use; callers import ``is_real``


def check_whole(name: str, value: Any, minimum: int, meaning: str = "") -> int:
    """A whole number >= ``minimum`` (an int, a NumPy int, or a float such as 1e4 that is whole)."""
    if not (_is_real(value) and math.isfinite(float(value)) and float(value).is_integer() and value >= minimum):
        raise refuse(name, value, f"a whole number >= {minimum}" + (f" ({meaning})" if meaning else ""))
    return int(value)


# The longest learning-rate ramp accepted: 1000x "auto"'s cap (Adam's second moment forgets in about
# 1000 steps at its default), so a larger value is a slip (an epoch count times a dataset size, say).
MAX_REWARM_STEPS = 10**6


def check_rewarm_steps(value: Any) -> Union[int, str]:
    """``"auto"`` or a whole number in [0, ``MAX_REWARM_STEPS``] (0: no learning-rate re-warm after a swap)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    rule = f"'auto' or a whole number >= 0 and <= {MAX_REWARM_STEPS} (optimizer steps of the ramp after a swap)"
    try:
        steps = check_whole("rewarm_steps", value, 0)
    except ValueError:
        raise refuse("rewarm_steps", value, rule) from None
    if steps > MAX_REWARM_STEPS:
        raise refuse("rewarm_steps", value, rule)
    return steps


def check_optional_whole(name: str, value: Any, minimum: int, none_means: str) -> Optional[int]:
    """None, or a whole number >= ``minimum``."""
    if value is None:
        return None
    try:
        return check_whole(name, value, minimum)
    except ValueError:
        raise refuse(name, value, f"None ({none_means}) or a whole number >= {minimum}") from None


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise refuse(name, value, "True or False")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise refuse(name, value, f"one of {tuple(choices)}")
    return value


def check_callable(name: str, value: Any, optional: bool = True) -> Any:
    if (value is None and optional) or callable(value):
        return value
    raise refuse(name, value, "a callable or None" if optional else "a callable")


# ------------------------------------------------------------------ which layers
def check_patterns(name: str, value: Any) -> Optional[list[str]]:
    """None, one fnmatch pattern over qualified module names, or a list of them (-> list or None)."""
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, (list, tuple)):
        raise refuse(name, value, "None, one fnmatch pattern (a string such as 'encoder.*') or a list of them")
    for p in patterns:
        if not isinstance(p, str):
            raise refuse(name, value, "a list of fnmatch patterns (strings)", f"element {p!r} is not a pattern")
        if not p:
            raise refuse(name, value, "a list of non-empty patterns", "an empty pattern matches no module name")
    return list(patterns)


def check_min_params(value: Any) -> int:
    return check_whole("min_params", value, 0, "layers with fewer weights stay dense")


def check_min_features(value: Any) -> int:
    return check_whole("min_features", value, 0, "layers whose min(in, out) is smaller stay dense")


# ------------------------------------------------------------------ statistics
def check_max_samples(value: Any) -> Optional[int]:
    return check_optional_whole("max_samples", value, 1, "no cap on the rows per layer")


def check_sample_fraction(value: Any) -> Union[float, str]:
    """``"auto"`` or the share in (0, 1] of each batch's rows kept for the statistics."""
    if isinstance(value, str) and value == "auto":
        return value
    if not (_is_real(value) and 0.0 < float(value) <= 1.0):
        raise refuse("sample_fraction", value, "a number in (0, 1] (the share of each batch's rows kept) or 'auto'")
    return float(value)


def check_max_statistics_bytes(value: Any) -> Optional[int]:
    """None (every layer's statistics in one pass) or a budget in bytes >= 1 for the float64
    statistics held at once (collection in several passes: ``surgery/statistics/passes.py``)."""
    return check_optional_whole(
        "max_bytes", value, 1, "one collection pass for every layer, whatever its statistics' size"
    )


def check_space(value: Any) -> str:
    return check_choice("space", value, ("input", "auto"))


def check_regularization(value: Any) -> float:
    if not (_is_real(value) and math.isfinite(float(value)) and float(value) >= 0.0):
        raise refuse("regularization", value, "a finite number >= 0 (0: the exact data-optimal fit)")
    return float(value)


# ------------------------------------------------------------------ ranks
def check_max_nmse(value: Any) -> float:
    if not (_is_real(value) and 0.0 <= float(value) < 1.0):
        raise refuse("max_nmse", value, "a number in [0, 1) (the largest NMSE a layer may reach)")
    return float(value)


def check_param_budget(value: Any) -> float:
    if not (_is_real(value) and 0.0 < float(value) <= 1.0):
        raise refuse(
            "param_budget", value, "a number in (0, 1] (the fraction of the targeted layers' dense weights to keep)"
        )
    return float(value)


# ------------------------------------------------------------------ running
def check_device(value: Any) -> Optional[torch.device]:
    if value is None or isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value)
        except (RuntimeError, ValueError):
            pass
    raise refuse("device", value, "None, a torch.device or a device string such as 'cpu' or 'cuda:0'")


def check_progress(value: Any) -> Union[bool, Callable[[int, int, str], None]]:
    if isinstance(value, bool) or callable(value):
        return value
    raise refuse("progress", value, "True, False or a callable (i, n, name)")


def check_name(value: Any) -> Optional[str]:
    if value is None or (isinstance(value, str) and value):
        return value
    raise refuse("name", value, "None or a non-empty string (the callback's key in a checkpoint)")


__all__ = [
    "check_callable", "check_choice", "check_device", "check_flag", "check_max_nmse", "check_max_samples",
    "check_max_statistics_bytes",
    "check_min_features", "check_min_params", "check_name", "check_optional_whole", "check_param_budget",
    "check_patterns", "check_progress", "check_regularization", "check_rewarm_steps", "check_sample_fraction",
    "check_space",
    "check_whole", "is_real", "refuse",
]
