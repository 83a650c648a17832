"""The optimizer state of a pair carried through its refactorization to another rank.

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
move every coordinate by about the learning rate, whatever its gradient). On the trained GPT of
``benchmarks/bench_compress_trained.py`` it lowered the progressive schedule's loss after recovery
on every seed (``docs/oneshot.md``, levers). A state holding anything else (another optimizer's
keys) or a second factor with a spatial kernel starts empty, as before. Under FSDP2 the factors
and moments are gathered for the mapping and the results sharded like the new factors (collectives
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


def _mapped(state: dict[str, Any], like: torch.Tensor, first: Callable[[torch.Tensor], torch.Tensor],
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


def carried_pair_state(old: Mapping[str, nn.Parameter], new: Mapping[str, nn.Parameter],
                       state: Mapping[torch.Tensor, Any]) -> dict[torch.Tensor, dict[str, Any]]:  # fmt: skip
    """The optimizer state of ``new``'s parameters carried from ``old``'s (both a pair's parameters
    relative to the layer: ``first.weight``, ``second.weight``, ``second.bias``), read from
    ``state`` (the optimizer's ``state``); empty where nothing can be carried (see the module
    docstring). A bias of unchanged size keeps its state as it was."""
    if not (_is_pair(old) and _is_pair(new)):
        return {}
    a_old, b_old, a_new, b_new = old["first.weight"], old["second.weight"], new["first.weight"], new["second.weight"]
    sa, sb = state.get(a_old), state.get(b_old)
    if not sa or not sb or not set(sa) <= KNOWN or not set(sb) <= KNOWN:
        return {}
    a0, b0, a1, b1 = _matrix(a_old, 0), _matrix(b_old, 1), _matrix(a_new, 0), _matrix(b_new, 1)
    if a0 is None or b0 is None or a1 is None or b1 is None or a0.shape[1] != a1.shape[1] or b0.shape[0] != b1.shape[0]:
        return {}
    f64 = torch.float64
    s = torch.linalg.lstsq(b0.to(f64), b1.to(f64)).solution  # [r, r1]: B1 = B0 S
    t = torch.linalg.lstsq(a0.to(f64).T, a1.to(f64).T).solution.T  # [r1, r]: A1 = T A0
    out: dict[torch.Tensor, dict[str, Any]] = {
        a_new: _mapped(sa, a_new, lambda m: s.T @ m, lambda v: (s * s).T @ v),
        b_new: _mapped(sb, b_new, lambda m: m @ t.T, lambda v: v @ (t * t).T),
    }
    bias_old, bias_new = old.get("second.bias"), new.get("second.bias")
    if bias_old is not None and bias_new is not None and bias_old.shape == bias_new.shape and state.get(bias_old):
        out[bias_new] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state[bias_old].items()}
    return out
