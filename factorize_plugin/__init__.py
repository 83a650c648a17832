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

__version__ = "0.1.0"

__all__ = [
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
