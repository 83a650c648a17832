"""The optimizer state carried onto a new pair, from the pair it refactorizes or the dense layer it
replaces.

A dense layer ``W`` replaced by ``B1 A1`` (``W ~ B1 A1``): for a gradient ``G`` of the layer's map,
``dL/dA1 = B1^T G`` and ``dL/dB1 = G A1^T``, so the weight's moments map by those products (a
weight stored transposed, [in, out], is told by the orientation the pair fits best).

A pair maps ``x -> B A x`` (first factor ``A`` [r, in...], second ``B`` [out, r]). A later milestone
refits it from its own map, so the new factors lie in the old ones' spans: ``A1 = T A`` and
``B1 = B S`` (``T`` [r1, r] and ``S`` [r, r1], found by least squares; exact for the solver's
optimum, whose column space is within ``B``'s and row space within ``A``'s). For a gradient ``G``
of the layer's map, ``dL/dA1 = S^T dL/dA`` and ``dL/dB1 = dL/dB T^T``, so

* first moments (Adam's ``exp_avg``, SGD's ``momentum_buffer``) map exactly that way;
* second moments (``exp_avg_sq``, ``max_exp_avg_sq``) by the element-wise squares of the same
  maps (the cross terms between old coordinates are neglected), clamped at 0;
* the step count carries on, so Adam's bias correction stays where it was.

Without this the new factors would start with empty moments mid-training (Adam's first steps then
move every coordinate by about the learning rate, whatever its gradient, which is what the
learning-rate re-warm was for): measured on the trained GPT of ``benchmarks/bench_compress_trained.py``
(``docs/oneshot.md``, levers). A state holding anything else (another optimizer's keys) or a second
factor with a spatial kernel starts empty, as before. Under FSDP2 the factors and moments are
gathered for the mapping and the results sharded like the new factors (collectives
every process runs for the same swaps in the same order).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn as nn

FIRST = ("exp_avg", "momentum_buffer")  # map linearly
SECOND = ("exp_avg_sq", "max_exp_avg_sq")  # map by the squared maps
KNOWN = {"step", *FIRST, *SECOND}


def _is_pair(params: Mapping[str, nn.Parameter]) -> bool:
    return "first.weight" in params and "second.weight" in params


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a ``DTensor`` (an FSDP2 shard) gathered (a collective: every process
    carries the same swaps in the same order), anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _placed_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (whole) placed as ``like`` is: sharded the same way where ``like`` is a DTensor."""
    if getattr(like, "device_mesh", None) is None:
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, like.device_mesh, like.placements)  # type: ignore[attr-defined]


def _matrix(p: torch.Tensor, rank_dim: int) -> Optional[torch.Tensor]:
    """A factor as a whole matrix with the rank on dimension ``rank_dim`` (first: rows, second:
    columns); None for a second factor with a spatial kernel."""
    if rank_dim == 1 and p.dim() > 2 and p.shape[2:].numel() != 1:
        return None
    w = _full(p.detach())
    return w.reshape(w.shape[0], -1) if rank_dim == 0 else w.reshape(w.shape[0], w.shape[1])


def _mapped(state: Any, like: torch.Tensor, first: Callable[[torch.Tensor], torch.Tensor],
            second: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or key == "step":
            out[key] = value.clone() if isinstance(value, torch.Tensor) else value
            continue
        whole = _full(value)
        flat = whole.to(torch.float64).reshape(whole.shape[0], -1)
        moved = first(flat) if key in FIRST else second(flat).clamp_min(0)
        out[key] = _placed_like(moved.reshape(like.shape).to(whole.dtype), like)
    return out


def _dense_matrix(w: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor) -> Optional[tuple[torch.Tensor, bool]]:
    """A dense weight as the matrix [out, in...] the new pair ``B1 A1`` approximates, and whether
    that is its transpose (a transposed linear layer, e.g. Hugging Face's ``Conv1D``, stores
    [in, out]); None if neither orientation fits. Only a square weight is ambiguous: then the
    orientation whose product with a few fixed probe vectors is nearest the pair's wins (never the
    whole product ``B1 A1``, which would cost a full matrix product per layer)."""
    flat = _full(w.detach()).reshape(w.shape[0], -1)
    shape = (b1.shape[0], a1.shape[1])
    fits = [(m, t) for m, t in ((flat, False), (flat.T, True)) if m.shape == shape]
    if len(fits) < 2:
        return fits[0] if fits else None
    x = torch.randn(shape[1], 4, generator=torch.Generator().manual_seed(0), dtype=a1.dtype).to(a1.device)
    approx = b1 @ (a1 @ x)
    return min(fits, key=lambda mt: float((mt[0].to(a1.dtype) @ x - approx).norm()))


def _known(st: Any) -> bool:
    return bool(st) and set(st) <= KNOWN


def carried_pair_state(old: Mapping[str, nn.Parameter], new: Mapping[str, nn.Parameter],
                       state: Mapping[torch.Tensor, Any]) -> dict[torch.Tensor, dict[str, Any]]:  # fmt: skip
    """The optimizer state of a new pair's parameters (``new``: ``first.weight``, ``second.weight``,
    ``second.bias``, relative to the layer) carried from the parameters it replaces (``old``: a pair's,
    or a dense layer's ``weight`` and ``bias``), read from ``state`` (the optimizer's ``state``);
    empty where nothing can be carried (see the module docstring). A bias of unchanged size keeps
    its state as it was."""
    if not _is_pair(new):
        return {}
    a_new, b_new = new["first.weight"], new["second.weight"]
    a1, b1 = _matrix(a_new, 0), _matrix(b_new, 1)
    if a1 is None or b1 is None:
        return {}
    f64 = torch.float64
    a1, b1 = a1.to(f64), b1.to(f64)
    out: dict[torch.Tensor, dict[str, Any]] = {}
    if _is_pair(old):  # B1 = B0 S, A1 = T A0: the gradients map by S^T and T^T
        a_old, b_old = old["first.weight"], old["second.weight"]
        sa, sb = state.get(a_old), state.get(b_old)
        a0, b0 = _matrix(a_old, 0), _matrix(b_old, 1)
        if not (_known(sa) and _known(sb)) or a0 is None or b0 is None or a0.shape[1] != a1.shape[1] \
                or b0.shape[0] != b1.shape[0]:  # fmt: skip
            return {}
        s = torch.linalg.lstsq(b0.to(f64), b1).solution  # [r, r1]
        t = torch.linalg.lstsq(a0.to(f64).T, a1.T).solution.T  # [r1, r]
        out[a_new] = _mapped(sa, a_new, lambda m: s.T @ m, lambda v: (s * s).T @ v)
        out[b_new] = _mapped(sb, b_new, lambda m: m @ t.T, lambda v: v @ (t * t).T)
        bias_old = old.get("second.bias")
    elif "weight" in old:  # W ~ B1 A1: dL/dA1 = B1^T dL/dW, dL/dB1 = dL/dW A1^T
        sw = state.get(old["weight"])
        found = _dense_matrix(old["weight"], a1, b1) if _known(sw) else None
        if found is None:
            return {}
        tr = (lambda m: m.T) if found[1] else (lambda m: m)
        out[a_new] = _mapped(sw, a_new, lambda m: b1.T @ tr(m), lambda v: (b1 * b1).T @ tr(v))
        out[b_new] = _mapped(sw, b_new, lambda m: tr(m) @ a1.T, lambda v: tr(v) @ (a1 * a1).T)
        bias_old = old.get("bias")
    else:
        return {}
    bias_new = new.get("second.bias")
    if bias_old is not None and bias_new is not None and bias_old.shape == bias_new.shape and state.get(bias_old):
        out[bias_new] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state[bias_old].items()}
    return out
