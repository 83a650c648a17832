"""Forward hooks and torch's fused transformer inference path.

In eval mode without grad, ``nn.TransformerEncoder`` (``enable_nested_tensor=True``, its default)
turns a batch with a ``src_key_padding_mask`` into a nested tensor for its layers' fused path; but
a ``TransformerEncoderLayer`` leaves that path as soon as one of its submodules has a forward hook,
and its plain path cannot take the nested tensor ("NestedTensorImpl doesn't support sizes"). So
while the library's hooks are attached (statistics, call counts, substituted outputs)
``torch.backends.mha``'s fast path is switched off (``hold`` / ``release``, ``fastpath_off``),
which also stops the encoder's nested-tensor conversion: it runs as
with ``enable_nested_tensor=False``, as it does in training mode (padded positions are computed,
and their rows enter the statistics as they enter training). The previous setting is back once
the last holder lets go.

Plain PyTorch: no Lightning.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_holders = 0
_saved = True


def hold() -> None:
    """Switches torch's transformer fast path off until the matching ``release``."""
    global _holders, _saved
    if _holders == 0:
        _saved = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
    _holders += 1


def release() -> None:
    """Ends one ``hold``; the last one restores the setting found by the first."""
    global _holders
    if _holders == 0:
        return
    _holders -= 1
    if _holders == 0:
        torch.backends.mha.set_fastpath_enabled(_saved)


@contextlib.contextmanager
def fastpath_off() -> Iterator[None]:
    """torch's transformer fast path (and nested-tensor conversion) off inside the block."""
    hold()
    try:
        yield
    finally:
        release()
