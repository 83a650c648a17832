"""Drop-in low-rank replacements for nn.Linear and nn.Conv2d.

Each is a pair: ``first`` maps the input into ``rank`` latent features (no bias), ``second`` maps
them back out (with the original layer's bias). The rank lives in the module's extra state, so a
state dict carries it and ``load_state_dict`` resizes the pair before the weights are copied
(``set_extra_state`` of a parent runs before its children load). The extra state is a small int64
tensor ``[EXTRA_STATE_MAGIC, kind code, rank]`` rather than a dict, so that tensor-only formats
(safetensors, Hugging Face ``save_pretrained``) can store it; ``decode_extra_state`` reads both it
and the older ``{"factorize_plugin": kind, "rank": r}`` dict.
"""

from __future__ import annotations

from typing import Any, Optional, Union, cast

import torch
import torch.nn as nn

from ..core.conv import conv_weight_to_matrix, matrix_to_conv_weight
from .transposed import conv1d_class

EXTRA_STATE_TAG = "factorize_plugin"
EXTRA_STATE_MAGIC = 0x46504C47  # "FPLG": marks a factorized pair's extra-state tensor
_KIND_CODES = {"linear": 1, "conv2d": 2}


def encode_extra_state(kind: str, rank: int) -> torch.Tensor:
    """The pair's extra state as an int64 tensor [3]: (magic, kind code, rank)."""
    return torch.tensor([EXTRA_STATE_MAGIC, _KIND_CODES[kind], int(rank)], dtype=torch.int64)


def decode_extra_state(value: Any) -> Optional[dict[str, Any]]:
    """``{"factorize_plugin": kind, "rank": r}`` if ``value`` is a factorized pair's extra state
    (tensor or legacy dict form), else None."""
    if isinstance(value, dict):
        return (
            {EXTRA_STATE_TAG: value[EXTRA_STATE_TAG], "rank": int(value["rank"])} if EXTRA_STATE_TAG in value else None
        )
    if isinstance(value, torch.Tensor) and value.shape == (3,) and not value.is_floating_point():
        magic, code, rank = (int(v) for v in value.tolist())
        kinds = {c: k for k, c in _KIND_CODES.items()}
        if magic == EXTRA_STATE_MAGIC and code in kinds:
            return {EXTRA_STATE_TAG: kinds[code], "rank": rank}
    return None


_Half = Union[nn.Linear, nn.Conv2d]  # the type of each half of a pair


class _FactorizedPair(nn.Module):
    """Shared behaviour: rank bookkeeping, the matrix view, extra state."""

    first: _Half
    second: _Half
    kind: str

    @property
    def rank(self) -> int:
        return self._rank

    def _build(self, rank: int, bias: bool, **kw) -> tuple[_Half, _Half]:
        """A new (first, second) pair at ``rank``; ``kw``: device and dtype."""
        raise NotImplementedError

    def _make_pair(self, rank: int, like: torch.Tensor, requires_grad: bool) -> None:
        """Replaces the pair by one of a new rank (new parameters), keeping the output bias."""
        old_bias = self.second.bias
        self.first, self.second = self._build(rank, old_bias is not None, device=like.device, dtype=like.dtype)
        if old_bias is not None:
            cast(torch.Tensor, self.second.bias).copy_(old_bias)  # built with a bias (old_bias is not None)
        self.requires_grad_(requires_grad)
        self._rank = rank

    def _like(self) -> torch.Tensor:
        return self.second.weight

    def set_factors(self, wa: torch.Tensor, wb: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        """Installs factors in matrix form: ``wa`` [D, r], ``wb`` [r, M], ``bias`` [M]. A new rank
        creates new parameter objects (the optimizer must be told); the same rank copies in place."""
        rank = wa.shape[1]
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        like = self._like()
        requires_grad = like.requires_grad
        with torch.inference_mode(False), torch.no_grad():
            if rank != self._rank:
                self._make_pair(rank, like, requires_grad)
            self._copy_factors(wa.to(like), wb.to(like))
            if bias is not None and self.second.bias is not None:
                self.second.bias.copy_(bias.to(like))

    def _copy_factors(self, wa: torch.Tensor, wb: torch.Tensor) -> None:
        raise NotImplementedError

    def _blank(self, rank: int, bias: bool, device: torch.device, dtype: torch.dtype) -> "_FactorizedPair":
        """A new pair of this configuration at ``rank`` (weights to be set)."""
        raise NotImplementedError

    def rebuilt(self, wa: torch.Tensor, wb: torch.Tensor, bias: Optional[torch.Tensor]) -> "_FactorizedPair":
        """A new pair (new module and parameters; this one is left as it is) of this configuration
        holding ``wa`` [D, r], ``wb`` [r, M] and ``bias`` [M] (given exactly when the pair has one)."""
        if (bias is None) != (self.second.bias is None):
            raise ValueError(f"a factorized {self.kind} layer {'with' if bias is None else 'without'} a bias got "
                             f"{'none' if bias is None else 'one'}")
        new = self.resized(wa.shape[1])
        new.set_factors(wa, wb, bias)
        return new

    def resized(self, rank: int) -> "_FactorizedPair":
        """A new pair of this configuration at ``rank`` (same bias, device, dtype and
        ``requires_grad``; weights to be set); this one is left as it is."""
        like = self._like()
        new = self._blank(rank, self.second.bias is not None, like.device, like.dtype)
        return new.requires_grad_(like.requires_grad)

    def matrix(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(W [D, M], bias [M] or None) of the composed map, float64."""
        raise NotImplementedError

    def get_extra_state(self) -> torch.Tensor:
        return encode_extra_state(self.kind, self._rank)

    def set_extra_state(self, state: Any) -> None:
        decoded = decode_extra_state(state)
        if decoded is None or decoded[EXTRA_STATE_TAG] != self.kind:
            raise ValueError(f"not the extra state of a factorized {self.kind} layer: {state!r}")
        rank = decoded["rank"]
        if rank != self._rank:
            like = self._like()
            with torch.inference_mode(False), torch.no_grad():
                self._make_pair(rank, like, like.requires_grad)

    def snapshot(self) -> tuple[dict[str, Optional[nn.Module]], int]:
        """What ``restore`` needs to undo later resizes: the current children (a resize gives the
        pair new children and leaves these, with their parameters, intact) and the rank."""
        return dict(self._modules), self._rank

    def restore(self, snapshot: tuple[dict[str, Optional[nn.Module]], int]) -> None:
        """Puts the pair back exactly as it was when ``snapshot`` was taken (same parameter objects)."""
        children, rank = snapshot
        for name, child in children.items():
            setattr(self, name, child)
        self._rank = rank

    def extra_repr(self) -> str:
        return f"rank={self._rank}"


class FactorizedLinear(_FactorizedPair):
    """``Linear(in_features, rank, bias=False)`` followed by ``Linear(rank, out_features, bias)``.

    Accepts inputs [..., in_features] and returns [..., out_features], like ``nn.Linear``.
    ``transposed_from``: the Hugging Face ``Conv1D`` class when the pair replaced one (weight
    stored [in, out]), so that ``to_dense`` gives that layer back rather than an ``nn.Linear``
    (whose [out, in] weight a square Conv1D's state dict would fill transposed, silently).
    """

    kind = "linear"
    first: nn.Linear
    second: nn.Linear
    transposed_from: Optional[type] = None

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features, self.out_features = in_features, out_features
        self._rank = int(rank)
        self.first, self.second = self._build(rank, bias, device=device, dtype=dtype)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, wa: torch.Tensor, wb: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> "FactorizedLinear":
        """Builds the pair replacing ``linear`` from factors ``wa`` [D, r], ``wb`` [r, M], ``bias`` [M]."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, wa.shape[1], linear.bias is not None, w.device, w.dtype)
        layer.requires_grad_(w.requires_grad)
        layer.set_factors(wa, wb, bias)
        return layer

    @classmethod
    def from_transposed(
        cls, layer: nn.Module, wa: torch.Tensor, wb: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> "FactorizedLinear":
        """The pair replacing a transposed linear layer (Hugging Face ``Conv1D``: weight [D, M],
        ``y = x @ W + b``); it computes the same kind of map, ``y = x @ wa @ wb + bias``."""
        w = cast(torch.Tensor, layer.weight)  # a Conv1D's weight parameter (nn.Module types attributes loosely)
        d, m = w.shape
        out = cls(d, m, wa.shape[1], layer.bias is not None, w.device, w.dtype)
        out.requires_grad_(w.requires_grad)
        out.set_factors(wa, wb, bias)
        out.transposed_from = conv1d_class(type(layer))
        return out

    def _blank(self, rank: int, bias: bool, device: torch.device, dtype: torch.dtype) -> "FactorizedLinear":
        new = FactorizedLinear(self.in_features, self.out_features, rank, bias, device, dtype)
        new.transposed_from = self.transposed_from
        return new

    def _build(self, rank: int, bias: bool, **kw) -> tuple[nn.Linear, nn.Linear]:
        return nn.Linear(self.in_features, rank, bias=False, **kw), nn.Linear(rank, self.out_features, bias=bias, **kw)

    @property
    def weight(self) -> torch.Tensor:
        """The composed dense weight [out_features, in_features] (``second.weight @ first.weight``),
        computed on each access, for code that reads a Linear's weight instead of calling it (torch's
        ``TransformerEncoderLayer`` fused inference path). Not a parameter; train ``first``/``second``."""
        return self.second.weight @ self.first.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The output bias [out_features] (``second.bias``), or None."""
        return self.second.bias

    def _copy_factors(self, wa: torch.Tensor, wb: torch.Tensor) -> None:
        self.first.weight.copy_(wa.T)
        self.second.weight.copy_(wb.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def matrix(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        w = self.first.weight.detach().double().T @ self.second.weight.detach().double().T
        b = None if self.second.bias is None else self.second.bias.detach().double()
        return w, b

    def to_dense(self) -> nn.Module:
        """Folds the pair back into one ``nn.Linear`` computing the same function (into the
        ``Conv1D`` it replaced, weight [in, out], when ``transposed_from`` is set)."""
        like = self._like()
        w, b = self.matrix()
        if self.transposed_from is not None:
            if b is None:
                raise ValueError("a Conv1D always has a bias: this pair has none, so it cannot be folded back into one")
            # Conv1D(nf, nx)
            dense = self.transposed_from(self.out_features, self.in_features).to(like.device, like.dtype)
            weight = w  # Conv1D holds W [in, out] itself
        else:
            dense = nn.Linear(
                self.in_features, self.out_features, self.second.bias is not None, like.device, like.dtype
            )
            weight = w.T
        with torch.no_grad():
            dense.weight.copy_(weight)
            if b is not None:
                dense.bias.copy_(b)
        return dense.requires_grad_(like.requires_grad)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self._rank}"


class FactorizedConv2d(_FactorizedPair):
    """A k_h x k_w ``Conv2d(in_channels, rank)`` with the original stride, padding, dilation and
    padding mode (no bias), followed by a 1 x 1 ``Conv2d(rank, out_channels, bias)``.

    Accepts [N, C_in, H, W] (or unbatched [C_in, H, W]) like the original ``nn.Conv2d``.
    """

    kind = "conv2d"
    first: nn.Conv2d
    second: nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        rank: int,
        stride=1,
        padding=0,
        dilation=1,
        padding_mode: str = "zeros",
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self._conv_args = dict(
            kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation, padding_mode=padding_mode
        )
        self._rank = int(rank)
        self.first, self.second = self._build(rank, bias, device=device, dtype=dtype)

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, wa: torch.Tensor, wb: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> "FactorizedConv2d":
        """Builds the pair replacing ``conv`` from matrix factors ``wa`` [C_in*k_h*k_w, r],
        ``wb`` [r, C_out], ``bias`` [C_out]."""
        if conv.groups != 1:
            raise NotImplementedError(f"groups={conv.groups}: grouped convolutions are not factorized")
        w = conv.weight
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, wa.shape[1], conv.stride, conv.padding,
            conv.dilation, conv.padding_mode, conv.bias is not None, w.device, w.dtype,
        )
        layer.requires_grad_(w.requires_grad)
        layer.set_factors(wa, wb, bias)
        return layer

    def _blank(self, rank: int, bias: bool, device: torch.device, dtype: torch.dtype) -> "FactorizedConv2d":
        return FactorizedConv2d(
            self.in_channels, self.out_channels, rank=rank, bias=bias, device=device, dtype=dtype, **self._conv_args
        )

    def _build(self, rank: int, bias: bool, **kw) -> tuple[nn.Conv2d, nn.Conv2d]:
        first = nn.Conv2d(self.in_channels, rank, bias=False, **self._conv_args, **kw)
        return first, nn.Conv2d(rank, self.out_channels, 1, bias=bias, **kw)

    def _copy_factors(self, wa: torch.Tensor, wb: torch.Tensor) -> None:
        self.first.weight.copy_(matrix_to_conv_weight(wa, self.in_channels, self.first.kernel_size))
        self.second.weight.copy_(matrix_to_conv_weight(wb, wb.shape[0], (1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def matrix(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        wa = conv_weight_to_matrix(self.first.weight.detach()).double()
        wb = conv_weight_to_matrix(self.second.weight.detach()).double()
        b = None if self.second.bias is None else self.second.bias.detach().double()
        return wa @ wb, b

    def to_dense(self) -> nn.Conv2d:
        """Folds the pair back into one ``nn.Conv2d`` computing the same function."""
        like = self._like()
        dense = nn.Conv2d(
            self.in_channels, self.out_channels, bias=self.second.bias is not None, device=like.device,
            dtype=like.dtype, **self._conv_args,
        )
        w, b = self.matrix()
        with torch.no_grad():
            dense.weight.copy_(matrix_to_conv_weight(w, self.in_channels, dense.kernel_size))
            if b is not None:
                cast(torch.Tensor, dense.bias).copy_(b)  # built with a bias (second.bias, so b, is not None)
        return dense.requires_grad_(like.requires_grad)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, rank={self._rank}"


FACTORIZED_PAIRS = (FactorizedLinear, FactorizedConv2d)
