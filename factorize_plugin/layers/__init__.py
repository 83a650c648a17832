"""Factorized layers and their matrix view. Knows nothing of schedules or Lightning."""

from .adapters import (
    FACTORIZABLE_TYPES,
    LayerView,
    check_factorizable,
    input_rows,
    install_factors,
    layer_view,
    new_pair,
    weight_matrix,
)
from .factorized import FACTORIZED_PAIRS, FactorizedConv2d, FactorizedLinear, decode_extra_state
from .transposed import TransposedLinear, plain_forward_class

__all__ = [
    "FACTORIZABLE_TYPES",
    "FACTORIZED_PAIRS",
    "FactorizedConv2d",
    "FactorizedLinear",
    "LayerView",
    "TransposedLinear",
    "decode_extra_state",
    "plain_forward_class",
    "check_factorizable",
    "input_rows",
    "install_factors",
    "layer_view",
    "new_pair",
    "weight_matrix",
]
