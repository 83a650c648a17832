"""factorize_plugin: progressive, data-aware low-rank factorization of Linear/Conv2d layers."""

from .core import (
    ConvGeometry,
    LowRankDecomposition,
    LowRankSolution,
    MomentAccumulator,
    decompose,
    factorize_conv2d,
    factorize_matrix,
    nmse_of,
    resolve_rank,
)

from .budget import ParamBudget, plan_budget
from .callback import LowRankFactorization
from .checkpoint import enable_factorized_loading, load_factorized, load_factorized_checkpoint, restore_structure
from .collector import ActivationCollector
from .layers import FactorizedConv2d, FactorizedLinear
from .oneshot import factorize_model
from .planner import LayerReport, format_reports
from .policies import FixedRank, MaxNMSE, make_policy
from .targets import select_layers

__version__ = "0.1.0"

__all__ = [
    "ActivationCollector",
    "FactorizedConv2d",
    "FactorizedLinear",
    "FixedRank",
    "LayerReport",
    "LowRankFactorization",
    "MaxNMSE",
    "ParamBudget",
    "factorize_model",
    "format_reports",
    "make_policy",
    "plan_budget",
    "enable_factorized_loading",
    "load_factorized",
    "load_factorized_checkpoint",
    "restore_structure",
    "select_layers",
    "ConvGeometry",
    "LowRankDecomposition",
    "LowRankSolution",
    "MomentAccumulator",
    "decompose",
    "factorize_conv2d",
    "factorize_matrix",
    "nmse_of",
    "resolve_rank",
]
