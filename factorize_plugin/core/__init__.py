"""The math: streaming statistics and the exact low-rank solver. Knows nothing of Lightning."""

from .api import factorize_conv2d, factorize_matrix
from .conv import ConvGeometry, conv_patches
from .solver import LowRankDecomposition, LowRankSolution, decompose, nmse_of, resolve_rank
from .statistics import MomentAccumulator

__all__ = [
    "ConvGeometry",
    "LowRankDecomposition",
    "LowRankSolution",
    "MomentAccumulator",
    "conv_patches",
    "decompose",
    "factorize_conv2d",
    "factorize_matrix",
    "nmse_of",
    "resolve_rank",
]
