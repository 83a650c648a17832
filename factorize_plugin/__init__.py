"""factorize_plugin: progressive, data-aware low-rank factorization of Linear/Conv2d layers.

``import factorize_plugin`` loads the math, the layers, the model-level tools and the engine (plain
PyTorch); the Lightning callback and the CLI load on first use (``factorize_plugin.LowRankFactorization``).

The top level holds the user's verbs and types (the README's "Public API" list, checked by
``tests/test_public_api.py``); the machinery stays importable from its floor package, e.g.
``factorize_plugin.surgery.swap.refactorize.refactorize``,
``factorize_plugin.surgery.statistics.collector.ActivationCollector``,
``factorize_plugin.surgery.select.targets.select_layers``, ``factorize_plugin.surgery.pipeline.prepare``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .core import (
    LowRankDecomposition,
    LowRankSolution,
    MomentAccumulator,
    decompose,
    factorize_conv2d,
    factorize_matrix,
)
from .engine import FactorizationEngine, PlainHost
from .layers import FactorizedConv2d, FactorizedLinear
from .surgery.oneshot import factorize_model
from .surgery.progressive import Progressive, progressive
from .surgery.ranks.policies import FixedRank, MaxNMSE, ParamBudget, RankPolicy
from .surgery.ranks.readiness import Readiness
from .surgery.report.reports import LayerReport, format_reports
from .surgery.specs import Auto, Statistics, Targets
from .surgery.swap.checkpoint import enable_factorized_loading, load_factorized, load_factorized_checkpoint
from .surgery.swap.hf import load_factorized_pretrained
from .surgery.timing.speed import SpeedGuard

if TYPE_CHECKING:  # loaded on first use (they import Lightning); visible to type checkers and IDEs
    from .integration.callback import LowRankFactorization
    from .integration.cli import FactorizeCLI

__version__ = "0.1.0"  # the only place the version is written: pyproject.toml reads it from here

_LAZY = {
    "LowRankFactorization": "factorize_plugin.integration.callback",
    "FactorizeCLI": "factorize_plugin.integration.cli",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'factorize_plugin' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, the lazy ones included (for ``dir()`` and completion)."""
    return sorted([*__all__, "__version__"])


__all__ = [
    # core: the seed API and the streaming solver
    "LowRankSolution",
    "factorize_matrix",
    "factorize_conv2d",
    "MomentAccumulator",
    "decompose",
    "LowRankDecomposition",
    # layers
    "FactorizedLinear",
    "FactorizedConv2d",
    # model surgery
    "RankPolicy",
    "FixedRank",
    "MaxNMSE",
    "ParamBudget",
    "progressive",
    "Progressive",
    "factorize_model",
    "LayerReport",
    "format_reports",
    "SpeedGuard",
    "Readiness",
    # the grouped arguments of every door
    "Targets",
    "Statistics",
    "Auto",
    "enable_factorized_loading",
    "load_factorized",
    "load_factorized_checkpoint",
    "load_factorized_pretrained",
    # the plain-PyTorch engine (when to factorize, for a hand-written loop)
    "FactorizationEngine",
    "PlainHost",
    # Lightning (loaded on first use)
    "LowRankFactorization",
    "FactorizeCLI",
]
