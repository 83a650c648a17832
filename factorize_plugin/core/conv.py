"""A Conv2d is a matrix product on image patches: the helpers that make that exact.

``conv2d(x, W) = patches(x) @ W.reshape(C_out, -1).T``, where ``patches`` pads the input the way
the convolution does (any ``padding_mode``, ``'same'`` / ``'valid'``, asymmetric 'same' padding)
and unfolds it with the convolution's own stride and dilation.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Iterator, Sequence, TypeGuard, Union, cast

import torch
import torch.nn.functional as F

IntPair = tuple[int, int]

_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def _is_int(v: object) -> TypeGuard[numbers.Integral]:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _pair(v: object, name: str, minimum: int = 0) -> IntPair:
    """``v`` as a pair of ints >= ``minimum``; ValueError naming ``name`` otherwise."""
    if _is_int(v):
        pair = (int(v), int(v))
    elif isinstance(v, (tuple, list, torch.Size)) and len(v) == 2 and all(_is_int(i) for i in v):
        pair = (int(v[0]), int(v[1]))
    else:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum} (an int or a pair of ints), got {v!r}")
    return pair


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Everything about a Conv2d that decides which input pixels feed which output pixel."""

    kernel_size: IntPair
    stride: IntPair = (1, 1)
    padding: Union[IntPair, str] = (0, 0)
    dilation: IntPair = (1, 1)
    padding_mode: str = "zeros"

    @classmethod
    def from_kwargs(cls, kernel_size: Sequence[int], **kwargs) -> "ConvGeometry":
        """Builds it from ``nn.Conv2d``-style keyword arguments. Raises NotImplementedError for
        ``groups != 1`` and TypeError for unknown keys."""
        known = {"stride", "padding", "dilation", "groups", "padding_mode", "bias"}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"unknown conv2d arguments: {sorted(unknown)}")
        groups = kwargs.get("groups", 1)
        if groups != 1:
            raise NotImplementedError(
                f"groups={groups}: grouped/depthwise convolutions are not factorized "
                "(a low-rank pair would mix the groups); exclude this layer"
            )
        padding = kwargs.get("padding", 0)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be 'same', 'valid', an int or a pair, got {padding!r}")
        else:
            padding = _pair(padding, "padding", minimum=0)
        mode = kwargs.get("padding_mode", "zeros")
        if mode not in _PAD_MODES:
            raise ValueError(f"padding_mode must be one of {sorted(_PAD_MODES)}, got {mode!r}")
        stride = _pair(kwargs.get("stride", 1), "stride", minimum=1)
        if padding == "same" and stride != (1, 1):
            raise ValueError("padding='same' requires stride 1 (as in torch.nn.Conv2d)")
        return cls(
            kernel_size=_pair(tuple(kernel_size), "kernel_size", minimum=1),
            stride=stride,
            padding=padding,
            dilation=_pair(kwargs.get("dilation", 1), "dilation", minimum=1),
            padding_mode=mode,
        )

    @classmethod
    def of(cls, conv: torch.nn.Conv2d) -> "ConvGeometry":
        return cls.from_kwargs(
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            padding_mode=conv.padding_mode,
        )

    def pad_amounts(self) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) as ``F.pad`` takes them; 'same' puts the odd pixel last."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            out = []
            for k, d in ((self.kernel_size[1], self.dilation[1]), (self.kernel_size[0], self.dilation[0])):
                total = d * (k - 1)
                out += [total // 2, total - total // 2]
            return tuple(out)  # type: ignore[return-value]
        ph, pw = cast(IntPair, self.padding)  # the strings are 'same' and 'valid' (from_kwargs)
        return (pw, pw, ph, ph)


def conv_patches(x: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """Unfolded input patches. ``x``: [N, C, H, W] -> [N * H_out * W_out, C * k_h * k_w], ordered so
    that ``conv_patches(x) @ W.reshape(C_out, -1).T`` equals the convolution without bias."""
    pad = geometry.pad_amounts()
    if any(pad):
        x = F.pad(x, pad, mode=_PAD_MODES[geometry.padding_mode])
    cols = F.unfold(x, geometry.kernel_size, dilation=geometry.dilation, stride=geometry.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def conv_output_size(hw: Sequence[int], geometry: ConvGeometry) -> tuple[int, int]:
    """(H_out, W_out) of the convolution on inputs of spatial size ``hw``."""
    left, right, top, bottom = geometry.pad_amounts()
    out = []
    for size, pad, k, s, d in zip(
        hw, (top + bottom, left + right), geometry.kernel_size, geometry.stride, geometry.dilation, strict=True
    ):
        out.append((size + pad - d * (k - 1) - 1) // s + 1)
    return out[0], out[1]


def conv_patches_at(x: torch.Tensor, geometry: ConvGeometry, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (indices into ``conv_patches(x)``'s rows) without unfolding the rest:
    [len(rows), C * k_h * k_w]."""
    h_out, w_out = conv_output_size(x.shape[-2:], geometry)
    n, rem = rows // (h_out * w_out), rows % (h_out * w_out)
    images, n = torch.unique(n, return_inverse=True)
    x = x[images]  # pad only the images that are sampled
    pad = geometry.pad_amounts()
    if any(pad):
        x = F.pad(x, pad, mode=_PAD_MODES[geometry.padding_mode])
    oi, oj = rem // w_out, rem % w_out
    (kh, kw), (sh, sw), (dh, dw) = geometry.kernel_size, geometry.stride, geometry.dilation
    hi = oi[:, None] * sh + torch.arange(kh, device=x.device) * dh  # [R, kh]
    wj = oj[:, None] * sw + torch.arange(kw, device=x.device) * dw  # [R, kw]
    patches = x[n[:, None, None], :, hi[:, :, None], wj[:, None, :]]  # [R, kh, kw, C]
    return patches.permute(0, 3, 1, 2).reshape(rows.shape[0], -1)


def iter_conv_patches(x: torch.Tensor, geometry: ConvGeometry, max_rows: int = 1 << 16) -> Iterator[torch.Tensor]:
    """``conv_patches`` in slices of images, so memory stays bounded: yields [rows, C * k_h * k_w]."""
    if x.shape[0] == 0:
        return
    per_image = conv_patches(x[:1], geometry).shape[0]
    step = max(1, max_rows // max(per_image, 1))
    for start in range(0, x.shape[0], step):
        yield conv_patches(x[start : start + step], geometry)


def conv_weight_to_matrix(weight: torch.Tensor) -> torch.Tensor:
    """[C_out, C_in, k_h, k_w] -> [C_in * k_h * k_w, C_out]."""
    return weight.reshape(weight.shape[0], math.prod(weight.shape[1:])).T  # explicit: a 0-channel weight has no -1


def matrix_to_conv_weight(mat: torch.Tensor, in_channels: int, kernel_size: Sequence[int]) -> torch.Tensor:
    """[C_in * k_h * k_w, C_out] -> [C_out, C_in, k_h, k_w]."""
    return mat.T.reshape(mat.shape[1], in_channels, *kernel_size)
