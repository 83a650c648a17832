"""Eval-mode speed of torch's nn.TransformerEncoder (fused fast path) dense vs with linear1/linear2
factorized (rank 1/4 of min(in, out)), one CPU thread, batch_first, no grad.

    python benchmarks/bench_encoder_fastpath.py

A factorized layer exposes its composed weight (``FactorizedLinear.weight``), so torch's fused
inference path still runs (it reads the weights, it does not call the layers): the output is right
but the work is that of the dense weights plus composing them. With
``torch.backends.mha.set_fastpath_enabled(False)`` the layers are called and the pairs' lower cost
applies. Prints milliseconds per batch for the four combinations.
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn as nn
from _common import package_version  # benchmarks/ is on sys.path when run as a script

from factorize_plugin import FactorizedLinear


def build(factorized: bool, dim: int = 256, layers: int = 4) -> nn.Module:
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(dim, 8, 4 * dim, dropout=0.0, batch_first=True), layers, enable_nested_tensor=False)
    if factorized:
        for layer in enc.layers:
            for name in ("linear1", "linear2"):
                lin = getattr(layer, name)
                r = min(lin.in_features, lin.out_features) // 4
                u, s, vh = torch.linalg.svd(lin.weight.detach().T, full_matrices=False)
                setattr(layer, name, FactorizedLinear.from_linear(lin, u[:, :r] * s[:r], vh[:r], lin.bias.detach()))
    return enc.eval()


def timed(model: nn.Module, x: torch.Tensor, fastpath: bool, repeats: int = 20) -> float:
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fastpath)
    try:
        with torch.no_grad():
            for _ in range(3):
                model(x)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t)
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
    return sorted(times)[len(times) // 2] * 1000


def main() -> None:
    torch.set_num_threads(1)
    x = torch.randn(16, 64, 256)
    out = {}
    for factorized in (False, True):
        model = build(factorized)
        for fastpath in (True, False):
            key = f"{'factorized' if factorized else 'dense'}, fast path {'on' if fastpath else 'off'}"
            out[key] = round(timed(model, x, fastpath), 2)
            print(f"{key:>32}: {out[key]:.2f} ms/batch")
    out["package"] = package_version()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
