"""Finding and replacing submodules by qualified name (no math, no Lightning)."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Iterable, Optional, Sequence

import torch.nn as nn


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replaces ``root.<name>`` (a dotted path) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def match_names(names: Iterable[str], include: Optional[Sequence[str]], exclude: Optional[Sequence[str]]) -> list[str]:
    """Names matching any ``include`` fnmatch pattern (all when None) and no ``exclude`` pattern."""
    out = []
    for n in names:
        if include is not None and not any(fnmatchcase(n, p) for p in include):
            continue
        if exclude and any(fnmatchcase(n, p) for p in exclude):
            continue
        out.append(n)
    return out
