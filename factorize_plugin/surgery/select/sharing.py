"""Layers that must not be swapped like a plain layer, found before training.

* **Aliases**: one module reachable under several names (``self.b = self.a``). It is one layer:
  selected once (under its first name) and swapped under every name (``alias_names``).
* **Shared weights**: a Parameter owned by more than one module (a head tied to the embedding, a
  decoder tied to the encoder, a bias shared with a parent). Factorizing one owner would untie them
  and drop the shared tensor from the optimizer: skipped (note) by default, refused when named.
* **Weight read by its parent**: ``nn.MultiheadAttention`` reads ``out_proj.weight`` inside
  ``F.multi_head_attention_forward`` and never calls ``out_proj``; replacing it changes nothing.
* **Own forward**: a subclass of Linear / Conv2d / Conv1D that overrides ``forward`` computes
  something a plain low-rank pair does not.
* **Never called during validation** (a training-only branch, a weight read by its parent, hooks
  bypassed by ``torch.compile``): found by counting calls on a cheap pass (``CallCounter``) or on the
  first collection, and explained by ``silent_reason``.

Plain PyTorch: no Lightning.
"""

from __future__ import annotations

import inspect
import textwrap
from typing import Iterable, Mapping, Optional, Sequence

import torch.nn as nn

from ...layers.adapters import layer_view
from ...layers.factorized import FACTORIZED_PAIRS
from ...layers.transposed import plain_forward_class
from .. import fastpath
from ..report.reports import LayerReport

_WILDCARDS = set("*?[")


def is_explicit(pattern: str) -> bool:
    """A target pattern without wildcards names one layer."""
    return not _WILDCARDS & set(pattern)


def all_module_names(model: nn.Module, aliases: bool = True) -> dict[str, nn.Module]:
    """Every qualified name of every submodule (with ``aliases=False`` only the first name of each),
    without the insides of factorized pairs (their ``first`` / ``second``)."""
    out: dict[str, nn.Module] = {}
    pair_prefixes: list[str] = []
    for name, module in model.named_modules(remove_duplicate=not aliases):
        if not name or any(name.startswith(p) for p in pair_prefixes):
            continue
        if isinstance(module, FACTORIZED_PAIRS):
            pair_prefixes.append(name + ".")
        out[name] = module
    return out


def primary_names(model: nn.Module) -> dict[str, str]:
    """Every name (aliases included) -> the first name of the same module (``named_modules()``'s)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, module in all_module_names(model).items():
        out[name] = first.setdefault(id(module), name)
    return out


def alias_names(model: nn.Module, modules: Mapping[str, nn.Module]) -> dict[str, list[str]]:
    """For each ``name -> module``, every name under which ``model`` reaches that module object
    (``name`` first)."""
    by_id: dict[int, list[str]] = {}
    for name, module in all_module_names(model).items():
        by_id.setdefault(id(module), []).append(name)
    out = {}
    for name, module in modules.items():
        names = by_id.get(id(module), [name])
        out[name] = [name] + [n for n in names if n != name]
    return out


def parameter_owners(model: nn.Module) -> dict[int, list[tuple[str, str]]]:
    """id(parameter) -> [(module name, attribute)] over distinct module objects (aliases count once)."""
    owners: dict[int, list[tuple[str, str]]] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():  # deduplicated: an alias is one owner
        if id(module) in seen:
            continue
        seen.add(id(module))
        for attr, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((name, attr))
    return owners


def _parent(model: nn.Module, name: str) -> tuple[Optional[nn.Module], str]:
    parent_name, _, child = name.rpartition(".")
    try:
        return (model.get_submodule(parent_name) if parent_name else model), child
    except AttributeError:
        return None, child


def skip_reason(model: nn.Module, name: str, module: nn.Module, owners: Optional[dict] = None) -> Optional[str]:
    """Why ``module`` (at ``name``) must not be replaced by a plain low-rank pair, or None."""
    if isinstance(module, FACTORIZED_PAIRS):
        return None
    parent, child = _parent(model, name)
    if isinstance(parent, nn.MultiheadAttention) and child == "out_proj":
        return (
            "nn.MultiheadAttention reads out_proj.weight directly and never calls out_proj: replacing it would "
            "change nothing"
        )
    if plain_forward_class(module) is None:
        return (
            f"{type(module).__name__} overrides forward: a plain low-rank pair would not compute what it computes"
        )
    owners = parameter_owners(model) if owners is None else owners
    for attr, p in module._parameters.items():
        others = [f"{n}.{a}" if n else a for n, a in owners.get(id(p), []) if n != name] if p is not None else []
        if others:
            return (
                f"its {attr} is shared with {others[0]!r} (tied weights): factorizing it would untie them and drop "
                "the shared tensor from training"
            )
    return None


def screen_layers(
    model: nn.Module, layers: Mapping[str, nn.Module], explicit: Iterable[str] = ()
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Splits ``layers`` into those safe to swap and ``{name: note}`` for the others.

    Raises:
        ValueError: a layer named explicitly (in ``explicit``) cannot be swapped; says why.
    """
    explicit = set(explicit)
    owners = parameter_owners(model)
    kept, notes = {}, {}
    for name, module in layers.items():
        reason = skip_reason(model, name, module, owners)
        if reason is None:
            kept[name] = module
        elif name in explicit:
            raise ValueError(f"layer '{name}' was named as a target but cannot be factorized: {reason}")
        else:
            notes[name] = reason
    return kept, notes


def explicit_targets(model: nn.Module, targets: Optional[Sequence[str]]) -> set[str]:
    """The (first) names of the layers that ``targets`` names without wildcards."""
    if not targets:
        return set()
    primary = primary_names(model)
    return {primary[p] for p in targets if is_explicit(p) and p in primary}


def skip_report(name: str, module: nn.Module, note: str, positions: float = 1.0) -> LayerReport:
    """A report for a layer left alone: unchanged rank, no samples, with the reason as its note;
    ``positions``: its output positions per sample (``ActivationCollector(counted=...)``), which
    its multiply-adds are counted at, as those of the factorized layers beside it."""
    view = layer_view(module)
    report = LayerReport.of(name, type(module).__name__, view, view.rank, 0.0, positions, 0)
    report.note = note
    return report


def check_optimizer(optimizer, before: Sequence, swaps: Sequence[tuple[Mapping, Mapping]]) -> None:
    """Raises if, after a swap, the optimizer lost a parameter or holds one twice: every parameter
    it held (``before``) must be in it once, or, if it was a swapped layer's, its trainable
    replacements must be.

    Args:
        before: the optimizer's parameters before the swap. swaps: ``(old named params, new named
            params)`` per swapped layer.
    """
    now = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [id(p) for p in now]
    if len(set(ids)) != len(ids):
        raise RuntimeError("after the swap the optimizer holds a parameter twice; refusing the swap")
    present = set(ids)
    replaced = {id(p) for old, _ in swaps for p in old.values()}
    lost = [tuple(p.shape) for p in before if id(p) not in present and id(p) not in replaced]
    if lost:
        raise RuntimeError(f"after the swap the optimizer lost {len(lost)} parameter(s) of shapes {lost[:3]}")
    before_ids = {id(p) for p in before}
    for old, new in swaps:
        if any(id(p) in before_ids for p in old.values()):
            missing = [n for n, p in new.items() if p.requires_grad and id(p) not in present]
            if missing:
                raise RuntimeError(f"after the swap the optimizer lacks the new parameter(s) {missing}")


# ------------------------------------------------------------- never called
class CallCounter:
    """Counts calls of ``layers`` (name -> module) while attached (forward pre-hooks)."""

    def __init__(self, layers: Mapping[str, nn.Module]) -> None:
        self.layers = dict(layers)
        self.calls = {name: 0 for name in self.layers}
        self._handles: list = []

    def attach(self) -> "CallCounter":
        if not self._handles:
            fastpath.hold()  # hooked transformer layers cannot take nested tensors (see fastpath)
            for name, module in self.layers.items():
                self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(module, args) -> None:
            self.calls[name] += 1

        return hook

    def detach(self) -> None:
        if self._handles:
            fastpath.release()
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "CallCounter":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def silent(self) -> list[str]:
        return [name for name, n in self.calls.items() if n == 0]


def _compiled(model: nn.Module, name: str) -> bool:
    return "_orig_mod" in name.split(".") or any(
        type(m).__name__ == "OptimizedModule" for m in model.modules()
    )


def silent_reason(model: nn.Module, name: str) -> str:
    """The likely reason why layer ``name`` was not called during validation."""
    if _compiled(model, name):
        return (
            "it sits inside a torch.compile'd module, whose compiled code skips hooks added after compilation "
            "(call torch._dynamo.reset() or collect on the uncompiled module)"
        )
    parent, child = _parent(model, name)
    if parent is not None:
        try:
            source = textwrap.dedent(inspect.getsource(type(parent).forward))
        except (OSError, TypeError):
            source = ""
        if f".{child}.weight" in source or f".{child}.bias" in source:
            return f"its parent {type(parent).__name__} reads {child}.weight directly instead of calling {child}"
        if "self.training" in source and f"self.{child}" in source:
            return f"it runs only in training mode (a training-only branch of {type(parent).__name__}.forward)"
    return (
        "nothing called it during validation "
        "(a training-only branch, an unused layer, or a weight read by its parent)"
    )


def resolve_silent(model: nn.Module, silent: Sequence[str], explicit: Iterable[str], when: str) -> dict[str, str]:
    """Notes ``{name: note}`` for layers that were never called (to be skipped), or raises for one
    that was named explicitly. ``when``: the pass that found them (for the message)."""
    explicit = set(explicit)
    notes = {}
    for name in silent:
        reason = silent_reason(model, name)
        if name in explicit:
            raise RuntimeError(
                f"layer '{name}' was named as a target but was never called during {when}: {reason}. "
                "It cannot be factorized from its inputs; remove it from the targets"
            )
        notes[name] = f"never called during {when}: {reason}"
    return notes
