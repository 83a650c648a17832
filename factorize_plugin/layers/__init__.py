"""Factorized layers and their matrix view. Knows nothing of schedules or Lightning."""

from .adapters import FACTORIZABLE_TYPES, LayerView, check_factorizable, input_rows, install_factors, layer_view, weight_matrix
from .factorized import FACTORIZED_PAIRS, FactorizedConv2d, FactorizedLinear

__all__ = [
    "FACTORIZABLE_TYPES",
    "FACTORIZED_PAIRS",
    "FactorizedConv2d",
    "FactorizedLinear",
    "LayerView",
    "check_factorizable",
    "input_rows",
    "install_factors",
    "layer_view",
    "weight_matrix",
]
