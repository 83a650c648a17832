"""One matrix view of every layer type we factorize: Linear, Conv2d and their factorized pairs.

The solver works on ``y = x @ W + b`` with W [D, M] (a Hugging Face ``Conv1D`` stores exactly that
W; an nn.Linear stores W.T); a Conv2d is that on its input patches
(D = C_in * k_h * k_w, M = C_out). Costs are per output position (per token / pixel).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union, cast

import torch
import torch.nn as nn

from ..core.conv import ConvGeometry, conv_output_size, conv_patches, conv_patches_at, conv_weight_to_matrix
from .factorized import FactorizedConv2d, FactorizedLinear
from .sharded import gathered, is_unit, shard_like
from .transposed import TransposedLinear

FACTORIZABLE_TYPES = (nn.Linear, nn.Conv2d, TransposedLinear, FactorizedLinear, FactorizedConv2d)


@dataclasses.dataclass(frozen=True)
class LayerView:
    """Sizes of a layer seen as a matrix.

    in_dim: D (features, or C_in * k_h * k_w); out_dim: M; rank_base: min(in, out) over features or
    channels (what a fractional rank is a fraction of); rank: current inner rank, None when dense.
    """

    in_dim: int
    out_dim: int
    rank_base: int
    rank: Optional[int]
    geometry: Optional[ConvGeometry]

    def params(self, rank: Optional[int] = None) -> int:
        """Weights (without bias) at ``rank`` (None: dense)."""
        return self.in_dim * self.out_dim if rank is None else rank * (self.in_dim + self.out_dim)

    @property
    def current_params(self) -> int:
        return self.params(self.rank)

    @property
    def max_useful_rank(self) -> int:
        """Largest rank whose pair has fewer multiply-adds (and weights) than the dense layer."""
        d, m = self.in_dim, self.out_dim
        return max(0, (d * m - 1) // (d + m))


def check_factorizable(module: nn.Module, name: str = "") -> None:
    """Raises TypeError / NotImplementedError, naming the layer, if it cannot be factorized."""
    label = f"layer '{name}'" if name else "this layer"
    if not isinstance(module, FACTORIZABLE_TYPES):
        raise TypeError(
            f"{label} is a {type(module).__name__}; only nn.Linear, nn.Conv2d (groups=1) and transformers' Conv1D "
            "can be factorized: "
            "remove it from the targets"
        )
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise NotImplementedError(f"{label} is a grouped Conv2d (groups={module.groups}); exclude it from the targets")


def layer_view(module: nn.Module) -> LayerView:
    check_factorizable(module)
    if isinstance(module, nn.Linear):
        return LayerView(
            module.in_features, module.out_features, min(module.in_features, module.out_features), None, None
        )
    if isinstance(module, FactorizedLinear):
        d, m = module.in_features, module.out_features
        return LayerView(d, m, min(d, m), module.rank, None)
    if isinstance(module, TransposedLinear):
        d, m = cast(torch.Tensor, module.weight).shape  # a Conv1D's weight [D, M]
        return LayerView(d, m, min(d, m), None, None)
    if isinstance(module, FactorizedConv2d):
        conv, c_out, rank = module.first, module.out_channels, module.rank
    else:
        conv = cast(nn.Conv2d, module)  # check_factorizable leaves only Conv2d here
        c_out, rank = conv.out_channels, None
    c_in = conv.in_channels
    d = c_in * conv.kernel_size[0] * conv.kernel_size[1]
    return LayerView(d, c_out, min(c_in, c_out), rank, ConvGeometry.of(conv))


def weight_matrix(module: nn.Module, own_dtype: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(W [D, M], bias [M] or None) in float64. ``own_dtype``: W in the weight's own dtype instead,
    a view of the parameter (no copy; a factorized layer's composed map is float64 either way).
    An FSDP2 unit's full weight is gathered for the read and copied (``sharded.gathered``): a
    collective, so every process reads the same layers in the same order."""
    if not is_unit(module):
        return _weight_matrix(module, own_dtype)
    with gathered(module):
        w, b = _weight_matrix(module, own_dtype)
        return w.clone(), None if b is None else b.clone()


def _weight_matrix(module: nn.Module, own_dtype: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(module, (FactorizedLinear, FactorizedConv2d)):
        return module.matrix()
    # a Linear, Conv1D or Conv2d: a weight parameter and a bias parameter or None
    layer_weight, layer_bias = cast(torch.Tensor, module.weight), cast(Optional[torch.Tensor], module.bias)
    bias = None if layer_bias is None else layer_bias.detach().double()
    weight = layer_weight.detach() if own_dtype else layer_weight.detach().double()
    if isinstance(module, nn.Linear):
        return weight.T, bias
    if isinstance(module, TransposedLinear):
        return weight, bias
    return conv_weight_to_matrix(weight), bias


def count_rows(x: torch.Tensor, view: LayerView) -> int:
    """How many solver rows the input ``x`` holds (tokens, or output positions of a conv)."""
    if view.geometry is None:
        return x.numel() // view.in_dim
    n = x.shape[0] if x.ndim == 4 else 1
    h, w = conv_output_size(x.shape[-2:], view.geometry)
    return n * h * w


def input_rows(x: torch.Tensor, view: LayerView, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The layer's input as solver rows [rows, D]: tokens for Linear, patches for Conv2d.
    ``keep``: indices of the rows wanted (convolution patches are then gathered only there)."""
    if view.geometry is None:
        rows = x.reshape(-1, view.in_dim)
        return rows if keep is None else rows[keep.to(rows.device)]
    if x.ndim == 3:  # unbatched conv input
        x = x.unsqueeze(0)
    if keep is None:
        return conv_patches(x, view.geometry)
    return conv_patches_at(x, view.geometry, keep.to(x.device))


def output_rows(y: torch.Tensor, view: LayerView, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The layer's output as rows [rows, M], in the order of ``input_rows`` (tokens; for Conv2d
    the output positions, image by image): row i is the layer's output for input row i."""
    if view.geometry is None:
        rows = y.reshape(-1, view.out_dim)
        return rows if keep is None else rows[keep.to(rows.device)]
    y = y.reshape(-1, view.out_dim, y.shape[-2] * y.shape[-1])  # [N, M, positions]
    if keep is None:
        return y.transpose(1, 2).reshape(-1, view.out_dim)
    keep = keep.to(y.device)
    return y[keep // y.shape[2], :, keep % y.shape[2]]


def install_factors(module: nn.Module, wa: torch.Tensor, wb: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Module:
    """Puts factors (``wa`` [D, r], ``wb`` [r, M], ``bias`` [M]) into the layer: a dense layer is
    replaced by a new factorized pair (returned; the caller swaps it in), a pair is resized in place.
    An FSDP2 unit is always replaced, by a new pair sharded like it (``sharded.shard_like``: a
    collective); the caller then calls ``sharded.rediscover_units`` on the model."""
    if is_unit(module):
        return shard_like(new_pair(module, wa, wb, bias), module)
    if isinstance(module, (FactorizedLinear, FactorizedConv2d)):
        module.set_factors(wa, wb, bias)
        return module
    return new_pair(module, wa, wb, bias)


def new_pair(
    module: nn.Module, wa: torch.Tensor, wb: torch.Tensor, bias: Optional[torch.Tensor]
) -> Union[FactorizedLinear, FactorizedConv2d]:
    """A new plain pair (new module, new parameters; never sharded) computing the factors, in
    ``module``'s place; ``module`` (dense or a pair) is left as it is."""
    if isinstance(module, (FactorizedLinear, FactorizedConv2d)):
        return cast(Union[FactorizedLinear, FactorizedConv2d], module.rebuilt(wa, wb, bias))
    if isinstance(module, nn.Linear):
        return FactorizedLinear.from_linear(module, wa, wb, bias)
    if isinstance(module, TransposedLinear):
        return FactorizedLinear.from_transposed(module, wa, wb, bias)
    return FactorizedConv2d.from_conv(cast(nn.Conv2d, module), wa, wb, bias)  # the rest are Conv2d
