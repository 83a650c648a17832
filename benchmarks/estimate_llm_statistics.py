"""Shape-level estimate (issue 23 item 4): per-rank float64 statistics memory and solve time of the
callback for LLaMA-7B / 13B / 70B shapes at 1, 8 and 64 DDP ranks.

Nothing is trained or downloaded: each model is built from a ``transformers.LlamaConfig`` with the
published sizes on the meta device (no memory), and one forward pass on meta tensors, with a
forward pre-hook on every targeted ``nn.Linear`` (the callback's default targets: all of them,
the untied ``lm_head`` included), records which layers get the very same input tensor. From the
module shapes alone it then mirrors what ``ActivationCollector`` (``space="auto"``, the callback's
``sample_fraction="auto"``) and ``core.solver.LowRankDecomposition`` do:

Memory, per layer with D inputs and M outputs:
  * ``space="auto"``: M < D: projected statistics z = x @ W, K = M, plus the copy of W the
    collector keeps for it: the accumulator's ``projection``, a snapshot in W's own dtype (bf16:
    2 D M bytes; upcast to float64 only inside the solve). The model's weights and outputs being
    bf16 (under autocast the layer's output is not exact), the input rows are projected in
    float32: W is cast to float32 for one drained block at a time (4 D M bytes, transient, one
    layer at a time: ``largest_transient_cast_bytes``, not in the totals); else K = D.
  * one ``MomentAccumulator``: 8 (K^2 + K + 1) bytes.
  * shared inputs (this branch): layers that got the same tensor object, with input statistics
    (not projected) and the same row sampling (width, ``"auto"`` fraction min(1, 0.05 M / D)),
    hold one accumulator (q/k/v of 7B and 13B; 70B's k/v are projected, so only gate/up share).
  * held-out halves: on one process (no DDP) the collector keeps two half accumulators while a
    layer has <= 64 K rows, which the default ``max_samples=200_000`` never passes for K >= 3125,
    and their union is cached when the solve reads them: 3x the accumulator at peak. Under DDP
    there are none. Reported separately (``single_process_holdout_bytes``).

Solve flops, per layer (``LowRankDecomposition`` without targets, no regularization), with d the
statistics' width (K) and m the solving weight's outputs (m = K = M for projected statistics,
whose weight is the identity):
  * m <= d: C W (2 d^2 m), B^T (C B) (2 d m^2), eigh(m), G = B V and C G (2 d m^2 each):
    2 d^2 m + 6 d m^2 GEMM flops + eigh of m.
  * m > d: C W (2 d^2 M), Cholesky (d^3 / 3), B B^T (2 d^2 M), R (B B^T) R^T (4 d^3), eigh(d),
    R^T U (2 d^3), B^T Y (2 M d^2), (B B^T) Y (2 d^3), C G (2 d^3):
    6 d^2 M + (1/3 + 10) d^3 GEMM flops + eigh of d.
  * eigh of n: 9 n^3 flops (symmetric QR with eigenvectors, Golub & Van Loan, Matrix
    Computations, 4th ed., section 8.3). The held-out curve's second solve (small sets on one
    process only) is left out.

Rates (assumptions, not measurements: no GPU was available to this estimate): GEMMs at 67 TFLOP/s,
the H200's FP64 Tensor Core peak (NVIDIA H200 datasheet: FP64 34 TFLOPS, FP64 Tensor Core 67
TFLOPS), so a lower bound on their time; eigendecompositions at 10 % of that (6.7 TFLOP/s):
LAPACK/cuSOLVER ``syevd`` spends about half its flops in a memory-bound tridiagonal reduction and
runs far below GEMM peak. Both are options; the flop counts are in the JSON to rescale.

Columns: "all-reduce" = every rank holds every layer's statistics and solves every layer (the
callback before issue 23, flat in the number of ranks); "sharded" = each layer reduced to and
solved by one owner rank, work balanced: statistics after the reduce and solve time divided by the
number of ranks (perfect balance assumed). Before the reduce every rank still collects every layer
of its own batches: the collection peak only drops below the total with several collection passes
(``max_statistics_bytes``): "passes" is how many the callback plans for a budget (``--budget-gb``,
default 4 GB, issue 23's goal for LLaMA-7B on 8 ranks) with its own planner
(``factorize_plugin.surgery.statistics.passes.plan_passes`` on these meta modules with bf16 weights: shared
inputs counted per layer, held-out halves 3x on one process, none under DDP), and "peak with
passes" the largest pass's bound: the per-rank collection peak. The number of passes does not
shrink with more ranks: each rank collects every layer of each pass before the reduce.

Writes ``benchmarks/results/llm_statistics_estimate.json`` and prints the README table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
from _common import package_version  # benchmarks/ is on sys.path when run as a script

MODELS = {
    # published sizes: LLaMA (Touvron et al. 2023) / Llama 2 configs, vocabulary 32000, untied head
    "LLaMA-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "LLaMA-13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40),
    "LLaMA-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
}
RANKS = (1, 8, 64)
AUTO_OVERHEAD = 0.05  # ActivationCollector.AUTO_OVERHEAD
HOLDOUT_LIMIT = 64  # HeldOutHalves.LIMIT_FACTOR
MAX_SAMPLES = 200_000  # the callback's default max_samples
EIGH_FLOPS = 9.0  # x n^3
GEMM_TFLOPS = 67.0
EIGH_TFLOPS = 6.7
BUDGET_GB = 4.0  # issue 23: LLaMA-7B shapes on 8 ranks within 4 GB of statistics per rank
W_BYTES = 2  # bf16 weights: the projection snapshot keeps W's dtype


def build(name: str, layers: int | None = None) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = dict(MODELS[name])
    if layers is not None:
        sizes["num_hidden_layers"] = layers
    cfg = LlamaConfig(vocab_size=32000, tie_word_embeddings=False, **sizes)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def input_groups(model: nn.Module) -> tuple[dict[str, nn.Linear], list[list[str]]]:
    """The targeted Linear layers and the groups of them that got the very same input tensor in
    one forward pass on meta tensors."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    seen: dict[str, torch.Tensor] = {}  # held: ids stay unique
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.setdefault(n, args[0])) for n, m in linears.items()]
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 8, dtype=torch.long, device="meta"))
    finally:
        for h in handles:
            h.remove()
    by_input: dict[int, list[str]] = {}
    for n in linears:
        by_input.setdefault(id(seen[n]), []).append(n)
    return linears, list(by_input.values())


def layer_figures(d: int, m: int) -> dict:
    """Statistics bytes and solve flops of one layer with D = d inputs, M = m outputs (space="auto")."""
    projected = m < d
    k = m if projected else d
    acc = 8 * (k * k + k + 1)
    w_copy = W_BYTES * d * m if projected else 0  # the projection snapshot, bf16
    cast = 4 * d * m if projected else 0  # float32 cast of W while one block of bf16 rows is projected
    if projected or m <= d:  # solving space k x k with weight I (projected) or [d, m]
        sd, sm = (k, k) if projected else (d, m)
        gemm = 2 * sd * sd * sm + 6 * sd * sm * sm
        eigh = EIGH_FLOPS * sm**3
    else:
        gemm = 6 * d * d * m + (1 / 3 + 10) * d**3
        eigh = EIGH_FLOPS * d**3
    holdout_factor = 3 if HOLDOUT_LIMIT * k >= MAX_SAMPLES else 1  # halves never merged: A, B, union
    return dict(
        d=d, m=m, projected=projected, width=k, accumulator_bytes=acc, w_copy_bytes=w_copy, transient_cast_bytes=cast,
        fraction=min(1.0, AUTO_OVERHEAD * m / d), gemm_flops=gemm, eigh_flops=eigh, holdout_factor=holdout_factor,
    )  # fmt: skip


def shared_groups(linears: dict[str, nn.Linear], groups: list[list[str]], figures: dict[str, dict]) -> list[list[str]]:
    """The collector's rule: same tensor, input statistics (not projected), same width and fraction."""
    out = []
    for g in groups:
        buckets: dict[tuple, list[str]] = {}
        for n in g:
            f = figures[n]
            key = ("alone", n) if f["projected"] else (f["d"], f["fraction"])
            buckets.setdefault(key, []).append(n)
        out += list(buckets.values())
    return out


def passes_at(linears: dict[str, nn.Linear], budget: int, world: int) -> dict:
    """What the callback plans under ``max_statistics_bytes=budget`` with ``world`` processes: its
    own planner on the (bf16, meta) modules; its setup check (every layer's bound once factorized)
    must pass too."""
    from factorize_plugin.surgery.statistics.passes import plan_passes, statistics_bound

    holdout = world == 1
    plan_passes(linears, budget, "auto", holdout, factorized=True)  # raises as the callback's setup would
    groups = plan_passes(linears, budget, "auto", holdout)
    peaks = [sum(statistics_bound(linears[n], "auto", holdout) for n in g) for g in groups]
    return {"passes": len(groups), "peak_bytes": max(peaks), "layers_per_pass": [len(g) for g in groups]}


def estimate(
    name: str, gemm_tflops: float = GEMM_TFLOPS, eigh_tflops: float = EIGH_TFLOPS, layers: int | None = None,
    budget_gb: float = BUDGET_GB,
) -> dict:  # fmt: skip
    model = build(name, layers)
    linears, groups = input_groups(model)
    bf16 = {n: m.to(torch.bfloat16) for n, m in linears.items()}  # the weights' dtype the figures assume
    figures = {n: layer_figures(m.in_features, m.out_features) for n, m in linears.items()}
    shared = shared_groups(linears, groups, figures)
    w_copies = sum(f["w_copy_bytes"] for f in figures.values())
    unshared = sum(f["accumulator_bytes"] for f in figures.values()) + w_copies
    with_sharing = sum(figures[g[0]]["accumulator_bytes"] for g in shared) + w_copies
    holdout = sum(figures[g[0]]["accumulator_bytes"] * figures[g[0]]["holdout_factor"] for g in shared) + w_copies
    gemm = sum(f["gemm_flops"] for f in figures.values())
    eigh = sum(f["eigh_flops"] for f in figures.values())
    solve_s = gemm / (gemm_tflops * 1e12) + eigh / (eigh_tflops * 1e12)
    block = "model.layers.0."
    block_figures = {n[len(block):]: f for n, f in figures.items() if n.startswith(block)}
    block_groups = [[n[len(block):] for n in g] for g in shared if g[0].startswith(block)]
    per_rank = {
        str(r): {
            "today_unshared_bytes": unshared,
            "today_shared_inputs_bytes": with_sharing,
            "sharded_after_reduce_bytes": with_sharing / r,
            "today_solve_s": solve_s,
            "sharded_solve_s": solve_s / r,
            "with_passes": passes_at(bf16, int(budget_gb * 1e9), r),
        }
        for r in RANKS
    }
    return {
        "config": MODELS[name],
        "budget_bytes": int(budget_gb * 1e9),
        "targeted_layers": len(linears),
        "shared_groups_per_block": block_groups,
        "statistics_bytes": {"unshared": unshared, "shared_inputs": with_sharing, "w_copies": w_copies,
                             "single_process_holdout_bytes": holdout,
                             "largest_transient_cast_bytes": max(f["transient_cast_bytes"] for f in figures.values())},  # fmt: skip
        "solve": {"gemm_flops": gemm, "eigh_flops": eigh, "seconds_one_rank": solve_s},
        "ranks": per_rank,
        "block0": {
            "layers": block_figures,
            "unshared_bytes": sum(f["accumulator_bytes"] + f["w_copy_bytes"] for f in block_figures.values()),
            "shared_inputs_bytes": sum(block_figures[g[0]]["accumulator_bytes"] for g in block_groups)
            + sum(f["w_copy_bytes"] for f in block_figures.values()),
            "flops": sum(f["gemm_flops"] + f["eigh_flops"] for f in block_figures.values()),
        },
    }


def table(results: dict) -> str:
    gb = 1e9
    lines = [
        "| shapes | ranks | statistics per rank, all-reduce | with shared inputs | shared + sharded, after the reduce | "
        f"passes within {results['assumptions']['budget_gb']:g} GB | peak per rank with passes | solve per rank, all-reduce | sharded |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in results["models"].items():
        for r, row in res["ranks"].items():
            lines.append(
                f"| {name} | {r} | {row['today_unshared_bytes'] / gb:.1f} GB | {row['today_shared_inputs_bytes'] / gb:.1f} GB | "
                f"{row['sharded_after_reduce_bytes'] / gb:.2f} GB | {row['with_passes']['passes']} | "
                f"{row['with_passes']['peak_bytes'] / gb:.2f} GB | {row['today_solve_s']:.0f} s | {row['sharded_solve_s']:.1f} s |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gemm-tflops", type=float, default=GEMM_TFLOPS, help="assumed float64 GEMM rate (default: H200 FP64 Tensor Core peak)")
    p.add_argument("--eigh-tflops", type=float, default=EIGH_TFLOPS, help="assumed float64 eigendecomposition rate")
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--budget-gb", type=float, default=BUDGET_GB, help="max_statistics_bytes for the passes columns (GB = 1e9 bytes)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "llm_statistics_estimate.json"))
    args = p.parse_args()
    start = time.perf_counter()
    results = {
        "assumptions": {
            "gemm_tflops_fp64": args.gemm_tflops, "eigh_tflops_fp64": args.eigh_tflops, "eigh_flops": "9 n^3",
            "rates_source": "H200 FP64 Tensor Core 67 TFLOPS (NVIDIA H200 datasheet), peak: a lower bound on GEMM time; "
                            "eigh at 10 % of it is an assumption (memory-bound tridiagonal reduction), not measured",
            "budget_gb": args.budget_gb,
            "space": "auto", "sample_fraction": "auto", "max_samples": MAX_SAMPLES, "weights": "bf16 (W copy: the bf16 projection snapshot; float32 cast per drained block, transient)",
        },  # fmt: skip
        "models": {name: estimate(name, args.gemm_tflops, args.eigh_tflops, budget_gb=args.budget_gb) for name in args.models},
    }
    results["seconds"] = time.perf_counter() - start
    results["package"] = package_version()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results))
    for name, res in results["models"].items():
        s = res["statistics_bytes"]
        print(f"{name}: shared groups per block {res['shared_groups_per_block']}; W copies {s['w_copies'] / 1e9:.1f} GB "
              f"(+ {s['largest_transient_cast_bytes'] / 1e9:.2f} GB transient float32 cast of the largest W); "
              f"one process with held-out halves {s['single_process_holdout_bytes'] / 1e9:.1f} GB")  # fmt: skip


if __name__ == "__main__":
    main()
