"""The measured numbers in the README and the docs come from ``benchmarks/results/``, so they cannot drift.

Three mechanisms:

* **generated blocks**: a page's ``<!-- generated: NAME -->`` ... ``<!-- /generated -->`` block must be
  exactly what ``NAME()`` below makes of the results files (the README's results table, the tables
  of ``docs/benchmarks.md``, the LLM estimate in ``docs/distributed.md``). After re-running a
  benchmark, ``python tests/test_docs_numbers.py --write`` rewrites the blocks in place;
* **claims**: a number in prose is written as ``CLAIMS`` formats it from its results field, and
  the page must contain that text (line breaks aside); the few numbers a results file holds only as
  text (a JSON note, the hand-recorded ``gpu_measurements_2026.md``) must be quoted as written there;
* **the guard**: in the README and ``docs/benchmarks.md`` every number that looks measured (a
  decimal, or a number with a unit: x, %, s, ms, MiB, GB, points) outside code, links and the two
  mechanisms above fails the test, unless ``SETTINGS`` lists it as a setting (a margin, a learning
  rate, a rank fraction), not a measurement.

"""

from __future__ import annotations

import json
import re
import statistics
import sys
from functools import cache
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
GUARDED = ["README.md", "docs/benchmarks.md"]  # every measured-looking number here is checked
BLOCK = re.compile(r"(<!-- generated: (\w+) -->\n)(.*?)(<!-- /generated -->)", re.S)


@cache
def res(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def sci(x: float, digits: int = 0) -> str:
    """``9e-11``, ``1.1e-8``: scientific notation without Python's padded exponent."""
    mantissa, exponent = f"{x:.{digits}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def pct(x: float, digits: int = 0) -> str:
    """A share in [0, 1] as a percentage."""
    return f"{100 * x:.{digits}f} %"


# ---------------------------------------------------------------------------------------------
# results, read once


def acc_row(method: str, fraction: float | None) -> dict:
    return next(
        s for s in res("accuracy_vs_compute.json")["summary"] if s["method"] == method and s["fraction"] == fraction
    )


def solver_row(n: int, rank: int) -> dict:
    return next(r for r in res("solver.json")["linear"] if r["N"] == n and r["rank"] == rank)


def stream_mib(n: int) -> float:
    return next(r for r in res("solver.json")["stream_memory"] if r["N"] == n)["peak_rss_delta_bytes"] / 2**20


def speed_row(width: int) -> dict:
    return next(r for r in res("speed_guard.json")["rows"] if r["width"] == width)


def lm(method: str) -> dict:
    return res("lm_tradeoff.json")["summary"]["methods"][method]


def pretrained_row(fraction: float, setting: str = "inner") -> dict:
    return next(r for r in res("pretrained_mnist.json")["settings"][setting]["rows"] if r["fraction"] == fraction)


def overhead(file: str, model: str, batches: int) -> float:
    return next(r for r in res(file)["rows"] if r["model"] == model and r["batches"] == batches)["ratio"]


def auto_stable_ranks(*layers: str) -> tuple[float, float]:
    """The lowest and highest stable rank the Fashion-MNIST auto runs watched on these layers."""
    values = [w["stable_rank"][k] for r in res("auto_schedule.json")["runs"] for w in r["watch"] for k in layers]
    return min(values), max(values)


def auto_guard_on_speedups() -> list[float]:
    return [x for r in res("auto_schedule_guard_on.json")["runs"] for x in r["speedup_model"] if x is not None]


def streaming_20x_from() -> int:
    """The fewest rows at which the streaming API is 20x as fast as Composer's (rank 128)."""
    ratios = res("solver.json")["goals"]["speedup_20x_at_N_ge_1e5"]["streaming_ratios_by_rank"]["128"]
    return min(int(n) for n, r in ratios.items() if r >= 20)


def power_of_ten(n: int) -> str:
    """``300000`` as ``3·10^5``."""
    e = len(str(n)) - 1
    return f"{n / 10**e:g}·10^{e}"


def _quoted(text: str, source: str) -> str:
    """A number a results file records only as text (a note), quoted as written there."""
    assert text in source, text
    return text


def lm_auto_watch() -> dict:
    """The ``watch`` entries of the LM benchmark's ``schedule="auto"`` runs (all seeds)."""
    entries = [e for run in res("lm_tradeoff.json")["runs"].values() for e in run["callback_auto"]["history"]
               if e.get("event") == "watch"]  # fmt: skip
    costs = [e["watch_cost"] for e in entries]
    ms = [1000 * e["signal_seconds"] for e in entries]
    return {"max": max(costs), "median": statistics.median(costs), "ms_low": min(ms), "ms_high": max(ms)}


def lm_auto_switches() -> list:
    return [e["switch_epoch"] for run in res("lm_tradeoff.json")["runs"].values() for e in run["callback_auto"]["history"]
            if e.get("event") == "watch" and e.get("reason")]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# generated blocks: each function returns the block's markdown (without the markers)

GENERATORS: dict[str, Callable[[], str]] = {}


def generated(fn: Callable[[], str]) -> Callable[[], str]:
    GENERATORS[fn.__name__] = fn
    return fn


LM_CALLBACK_ROWS = ("callback_early_1:0.25", "callback_budget_macs_1:0.25", "callback_late_3:0.25",
                    "callback_late_budget_macs_3:0.25", "callback_gradual_1:1/2,2:1/3,3:1/4", "callback_auto")


def small_wins_every_seed() -> bool:
    """The smaller dense model trained for a callback run's time ends below it on every seed, every row."""
    return all(seed["loss_vs_small_dense_equal_time"] > 0
               for m in LM_CALLBACK_ROWS for seed in lm(m)["seeds"].values())  # fmt: skip


@generated
def readme_results() -> str:
    dense, prog, init = acc_row("dense", None), acc_row("progressive", 0.625), acc_row("init", 0.625)
    prog4, init4 = acc_row("progressive", 0.3125), acc_row("init", 0.3125)
    s = solver_row(100_000, 128)
    budget, d, small = lm("callback_budget_macs_1:0.25"), lm("dense"), lm("small_dense_d152")
    wide, narrow = speed_row(1024)["training"], speed_row(64)["training"]
    one = pretrained_row(0.1)
    composer_1e6 = solver_row(1_000_000, 128)["composer_total_bytes_estimate"] / 2**30
    rows = [
        "| benchmark (CPU) | result | results file |",
        "|---|---|---|",
        f"| Fashion-MNIST CNN, 3 seeds, {pct(prog['target_macs_kept'])} of the factorized layers' multiply-adds "
        f"| callback, progressive schedule: **{prog['acc_mean']:.1f} %** test accuracy; dense {dense['acc_mean']:.1f} %; "
        f"factorized at initialization (Composer's way) {init['acc_mean']:.1f} % | `accuracy_vs_compute.json` |",
        f"| the same at {pct(prog4['target_macs_kept'])} of the multiply-adds | callback {prog4['acc_mean']:.1f} %; "
        f"at initialization {init4['acc_mean']:.1f} % | `accuracy_vs_compute.json` |",
        f"| byte-level GPT, 3 seeds, 240 steps | callback, multiply-add budget at epoch 1: **{budget['mean_final_val_loss']:.3f}** "
        f"nats/byte in {budget['mean_time']:.0f} CPU-s; dense {d['mean_final_val_loss']:.3f} in {d['mean_time']:.0f} s, "
        f"{budget['mean_dense_at_equal_time']:.3f} given {budget['mean_time']:.0f} s; factorized at initialization "
        f"{lm('init_0.25')['mean_final_val_loss']:.3f} | `lm_tradeoff.json` |",
        f"| the same, a dense model of width 152 (the factorized model's multiply-adds) | {small['mean_final_val_loss']:.3f} "
        f"in {small['mean_time']:.0f} CPU-s; trained for the callback's {budget['mean_time']:.0f} s: "
        f"**{budget['mean_small_dense_at_equal_time']:.3f}**; trained for each schedule's own time, the callback's loss "
        f"is {pct(min(lm(m)['mean_loss_vs_small_dense_equal_time'] for m in LM_CALLBACK_ROWS), 1)} to "
        f"{pct(max(lm(m)['mean_loss_vs_small_dense_equal_time'] for m in LM_CALLBACK_ROWS), 1)} above it"
        + (" on every seed" if small_wins_every_seed() else "")
        + ": from scratch, train the smaller model ([when not to use it](docs/when-not.md)) | `lm_tradeoff.json` |",
        f"| solver against Composer's `factorize_matrix`, 512 features, rank 128, 10^5 rows "
        f"| NMSE {s['nmse_ratio_composer_over_ours']:.1f}x lower, {s['time_ratio_composer_over_ours']:.1f}x faster "
        f"({s['time_ratio_composer_over_ours_stream']:.1f}x streaming); streaming memory flat: peak growth "
        f"{stream_mib(100_000):.1f} MiB at 10^5 rows and {stream_mib(1_000_000):.1f} MiB at 10^6 "
        f"(Composer: {composer_1e6:.1f} GiB at 10^6) | `solver.json` |",
        f"| speed decision, 1024-wide MLP, 1 thread | trains at **{wide['guarded']['speedup_vs_dense']:.2f}x** the dense "
        f"step rate with {pct(wide['guarded']['flops_ratio_vs_dense'])} of the FLOPs; a 64-wide MLP is kept dense "
        f"(factorized it would train at {narrow['unguarded']['speedup_vs_dense']:.2f}x) | `speed_guard.json` |",
        f"| one-shot `factorize_model`, pretrained MNIST CNN, 10 % of the inner layers' weights "
        f"| {pct(one['budget']['accuracy'], 1)} accuracy; uniform ranks {pct(one['uniform']['accuracy'], 1)}, "
        f"plain SVD {pct(one['svd']['accuracy'], 1)}; dense {pct(res('pretrained_mnist.json')['dense_accuracy'], 1)} "
        "| `pretrained_mnist.json` |",
    ]
    return "\n".join(rows)


@generated
def decision_stability() -> str:
    rows = [
        "| decision code | parallel load | runs with the most common structure | distinct structures | rounds per comparison |",
        "|---|---|---|---|---|",
    ]
    for c in res("decision_stability.json")["cells"]:
        code = "before (one median of 3 per structure)" if c["code"] == "before" else "after (paired rounds, 95 % interval)"
        rounds = c.get("rounds_min_median_max")
        rounds = "-" if rounds is None else f"{rounds[0]}-{rounds[2]} (median {rounds[1]:g})"
        rows.append(f"| {code} | {'two busy processes' if c['load'] else 'none'} | "
                    f"{c['identical_to_most_common']} of {c['runs']} | {c['distinct_structures']} | {rounds} |")
    return "\n".join(rows)


ACC_METHODS = {
    "dense": "dense",
    "init": "factorized at initialization (Composer's way)",
    "oneshot": "dense, then `factorize_model` and fine-tuning",
    "late": "callback, one milestone `{6: f}`",
    "progressive": "callback, progressive `{3: sqrt(f), 6: f}`",
}


@generated
def accuracy_vs_compute() -> str:
    fractions = res("accuracy_vs_compute.json")["config"]["fractions"]
    dense = acc_row("dense", None)
    head = " | ".join(
        f"f = {f:g}: {pct(acc_row('init', f)['target_macs_kept'])} of the multiply-adds" for f in fractions
    )
    rows = [f"| method | {head} |", "|---" * (len(fractions) + 1) + "|"]
    rows.append(f"| dense | {dense['acc_mean']:.1f} ± {dense['acc_std']:.1f} %" + " |" * len(fractions))
    for method, label in ACC_METHODS.items():
        if method == "dense":
            continue
        cells = []
        for f in fractions:
            s = acc_row(method, f)
            cells.append(f"{s['acc_mean']:.1f} ± {s['acc_std']:.1f} % ({s['diff_vs_dense_mean']:+.1f})")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


@generated
def solver_table() -> str:
    rows = [
        "| rank | rows N | NMSE, Composer / ours | time, Composer / `factorize_matrix` | time, Composer / streaming | Composer's memory (estimate) |",
        "|---|---|---|---|---|---|",
    ]
    for r in res("solver.json")["linear"]:
        rows.append(
            f"| {r['rank']} | {r['N']:,} | {r['nmse_ratio_composer_over_ours']:.2f} | {r['time_ratio_composer_over_ours']:.2f} "
            f"| {r['time_ratio_composer_over_ours_stream']:.2f} | {r['composer_total_bytes_estimate'] / 2**30:.2f} GiB |"
        )
    return "\n".join(rows)


@generated
def solver_memory() -> str:
    rows = ["| rows N | streaming peak memory growth |", "|---|---|"]
    for r in res("solver.json")["stream_memory"]:
        rows.append(f"| {r['N']:,} | {r['peak_rss_delta_bytes'] / 2**20:.1f} MiB |")
    return "\n".join(rows)


@generated
def speed_guard_table() -> str:
    rows = [
        "| model | what | with the speed decision: speed vs dense | FLOPs vs dense | decision off: speed vs dense | FLOPs vs dense |",
        "|---|---|---|---|---|---|",
    ]
    for r in res("speed_guard.json")["rows"]:
        for phase in ("training", "inference"):
            g, u = r[phase]["guarded"], r[phase]["unguarded"]
            rows.append(
                f"| {r['width']}-wide MLP, {r['rows']} rows | {phase} | {g['speedup_vs_dense']:.2f}x | {g['flops_ratio_vs_dense']:.2f} "
                f"| {u['speedup_vs_dense']:.2f}x | {u['flops_ratio_vs_dense']:.2f} |"
            )
    return "\n".join(rows)


LM_METHODS = {
    "dense": "dense",
    "small_dense_d152": "dense, width 152 (the factorized multiply-adds)",
    "init_0.25": "factorized at initialization, rank 1/4",
    "init_equal_time": "the same, given the fastest callback run's time",
    "callback_early_1:0.25": "callback `{1: 1/4}`",
    "callback_late_3:0.25": "callback `{3: 1/4}`",
    "callback_gradual_1:1/2,2:1/3,3:1/4": "callback `{1: 1/2, 2: 1/3, 3: 1/4}`",
    "callback_budget_macs_1:0.25": 'callback `{1: ParamBudget(1/4, metric="macs", sensitivity=False)}`',
    "callback_late_budget_macs_3:0.25": "callback, the same budget at epoch 3",
    "callback_auto": 'callback `"auto"`, target 1/4',
    "exp_early_no_rewarm": "callback `{1: 1/4}` without the re-warm",
    "exp_early_ends_dense": "callback `{1: 1/4}`, first and last blocks dense",
}


@generated
def lm_tradeoff_table() -> str:
    rows = [
        "| method | final val loss (nats/byte) | CPU-s | speed vs dense | loss vs dense, equal steps "
        "| dense given the same time | loss vs that | width 152 given the same time | loss vs that |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, label in LM_METHODS.items():
        m = lm(key)
        eq = "-" if key == "dense" else f"{m['mean_dense_at_equal_time']:.3f}"
        vs = "-" if key == "dense" else f"{100 * m['mean_loss_vs_dense_equal_time']:+.1f} %"
        small = "mean_small_dense_at_equal_time" in m
        seq = f"{m['mean_small_dense_at_equal_time']:.3f}" if small else "-"
        svs = f"{100 * m['mean_loss_vs_small_dense_equal_time']:+.1f} %" if small else "-"
        rows.append(f"| {label} | {lm_cells(m)} | {eq} | {vs} | {seq} | {svs} |")
    return "\n".join(rows)


def lm_cells(m: dict) -> str:
    """An LM trade-off summary row's loss, time, speed and loss against dense at equal steps."""
    return (f"{m['mean_final_val_loss']:.3f} | {m['mean_time']:.0f} | {m['mean_speed_vs_dense']:.2f}x "
            f"| {100 * m['mean_loss_vs_dense_equal_steps']:+.1f} %")  # fmt: skip


def _lm_auto(key: str) -> dict:
    return res("lm_tradeoff_auto_defaults.json")["summary"]["methods"][key]


LM_AUTO_ROWS = {
    "dense": "dense",
    "callback_auto_release_defaults": '`"auto"`, the defaults of 0.1.0: `ParamBudget(0.5, metric="macs")` (output probe), `latest=0.75`',
    "callback_auto_nmse_budget_latest_0.75": '`"auto"`, the defaults now: the same budget by NMSE alone (no probe), `latest=0.75`',
    "callback_auto_nmse_budget_latest_0.5": "the same, switching at the latest at epoch 3 (`latest=0.5`)",
}


@generated
def lm_auto_defaults_table() -> str:
    rows = ["| `schedule` | final val loss | CPU-s | speed vs dense | loss vs dense, equal steps |", "|---|---|---|---|---|"]
    rows += [f"| {label} | {lm_cells(_lm_auto(key))} |" for key, label in LM_AUTO_ROWS.items()]
    return "\n".join(rows)


@generated
def lm_compressed_dense() -> str:
    methods = res("lm_tradeoff.json")["summary"]["methods"]
    runs = sorted((m for m in methods.values() if m["kind"] == "dense_compressed"), key=lambda m: m["mean_steps"])
    rows = ["| steps | seeds | final val loss | CPU-s |", "|---|---|---|---|"]
    for m in runs:
        rows.append(
            f"| {m['mean_steps']:.0f} | {m['n_seeds']} | {m['mean_final_val_loss']:.3f} | {m['mean_time']:.0f} |"
        )
    return "\n".join(rows)


@generated
def auto_schedule_table() -> str:
    rows = [
        '| speed decision | late `{6: f}` | progressive `{3: sqrt(f), 6: f}` | `"auto"` | switch epochs (per seed) | cost of watching: max, median |',
        "|---|---|---|---|---|---|",
    ]
    for file, label in (
        ("auto_schedule.json", "off (same ranks)"),
        ("auto_schedule_guard_on.json", "on (the default)"),
    ):
        s = res(file)["summary"][0]
        cells = [f"{s['all'][m]['acc_mean']:.2f} ± {s['all'][m]['acc_std']:.2f} %, {s['all'][m]['cpu_mean']:.1f} CPU-s"
                 for m in ("late", "progressive", "auto")]  # fmt: skip
        epochs = ", ".join(str(e) for run in s["switch_epochs"] for e in run)
        rows.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | {epochs} | {pct(s['watch_cost_max'], 2)}, {pct(s['watch_cost_median'], 2)} |"
        )
    return "\n".join(rows)


@generated
def pretrained_table() -> str:
    d = res("pretrained_mnist.json")
    rows = [
        "| weights kept | `ParamBudget` (output-weighted) | ranks by summed NMSE | uniform ranks | plain SVD |",
        "|---|---|---|---|---|",
    ]
    for r in d["settings"]["inner"]["rows"]:
        cells = [pct(r[m]["accuracy"], 1) for m in ("budget", "unweighted", "uniform", "svd")]
        rows.append(f"| {pct(r['fraction'])} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


COMPRESS_METHODS = {
    "svd": "truncated SVD of each weight (no data)",
    "asvd": "ASVD-style (columns scaled by mean absolute input)",
    "exact_uniform": "exact data-aware fit, uniform ranks",
    "exact_budget_params": "exact fit, `ParamBudget` ranks",
}


@generated
def compress_trained_table() -> str:
    d = res("compress_trained.json")
    cells = d["stages"]["compress"]
    fractions = list(cells["svd"])
    rows = [
        "| method | " + " | ".join(f"{pct(float(f))} kept" for f in fractions) + " |",
        "|---" * (len(fractions) + 1) + "|",
    ]
    for key, label in COMPRESS_METHODS.items():
        rows.append(f"| {label} | " + " | ".join(f"{cells[key][f]['val_loss']:.3f}" for f in fractions) + " |")
    rows.append(f"| the trained dense model | {d['dense']['val_loss']:.3f} (all) |" + " |" * (len(fractions) - 1))
    return "\n".join(rows)


RECOVER_METHODS = {
    "svd_ft": "weight SVD, then fine-tuning",
    "exact_uniform_ft": "exact fit at uniform ranks, then fine-tuning",
    "exact_budget_params_ft": "exact fit, `ParamBudget` ranks, then fine-tuning",
    "callback_switch0": "the callback, one switch at step 0",
    "callback_progressive": "the callback, `progressive` over steps 0 / 40 / 80, each swap's optimizer state fresh (the rule before)",
    "callback_progressive_carried": "the same, every new pair's optimizer state carried from what it replaces (the library's rule now)",
}


def recover_mean(method: str, fraction: str, name: str = "compress_trained.json") -> tuple[float, float, float, int]:
    """(mean, min, max, seeds) of a recovery cell's validation loss over its seeds."""
    losses = [c["val_loss"] for c in res(name)["stages"]["recover"][method][fraction].values()]
    return statistics.mean(losses), min(losses), max(losses), len(losses)


@generated
def compress_recover_table() -> str:
    recover = res("compress_trained.json")["stages"]["recover"]
    fractions = [f for f in ("0.8", "0.6", "0.4", "0.2") if any(f in recover.get(m, {}) for m in RECOVER_METHODS)]
    rows = [
        "| after 120 steps of recovery | " + " | ".join(f"{pct(float(f))} kept" for f in fractions) + " |",
        "|---" * (len(fractions) + 1) + "|",
    ]
    for key, label in RECOVER_METHODS.items():
        cells = []
        for f in fractions:
            if f not in recover.get(key, {}):
                cells.append("not run")
                continue
            mean, lo, hi, n = recover_mean(key, f)
            cells.append(f"{mean:.4f} ({lo:.4f}-{hi:.4f}, {n} seeds)")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    mean, lo, hi, n = recover_mean("dense_ft", "1.0")
    rows.append(f"| the trained dense model, fine-tuned | {mean:.4f} ({lo:.4f}-{hi:.4f}, {n} seeds) |"
                + " |" * (len(fractions) - 1))
    return "\n".join(rows)


LEVERS = {  # item 4's levers at 40 % kept, each against the method it changes
    "exact_budget_params_ft_kd": ("exact_budget_params_ft", "one-shot + fine-tuning, with distillation from the dense model"),
    "exact_budget_params_ft_fade": ("exact_budget_params_ft", "one-shot + fine-tuning, with a fading dense residual"),
    "callback_progressive_no_rewarm": ("callback_progressive", "progressive, without the learning-rate re-warm"),
    "callback_progressive_early": ("callback_progressive", "progressive, milestones at steps 0 / 15 / 30"),
    "callback_progressive_kd": ("callback_progressive", "progressive, with distillation from the dense model"),
    "callback_progressive_fade": ("callback_progressive", "progressive, with a fading dense residual"),
    "callback_progressive_dense": ("callback_progressive", "progressive, later milestones fitted to the trained dense layers"),
    "callback_progressive_dense_kd": ("callback_progressive_kd", "progressive with distillation, later milestones fitted to the trained dense layers"),
    "callback_progressive_carry": ("callback_progressive", "progressive, a refactorized pair's optimizer state carried, re-warm after every swap"),
    "callback_progressive_carry_no_rewarm": ("callback_progressive_no_rewarm", "progressive without re-warm, a refactorized pair's optimizer state carried"),
    "callback_progressive_carry_kd_no_rewarm": ("callback_progressive_kd", "progressive with distillation, a refactorized pair's state carried, no re-warm"),
    "callback_progressive_carried": ("callback_progressive", "progressive, every new pair's state carried (the library's rule now: no re-warm under AdamW)"),
}


@generated
def compress_levers_table() -> str:
    recover = res("compress_trained.json")["stages"]["recover"]
    rows = [
        "| lever (40 % kept, 120 steps) | validation loss, mean | change against the method without it, per seed |",
        "|---|---|---|",
    ]
    for key, (base, label) in LEVERS.items():
        if "0.4" not in recover.get(key, {}):
            rows.append(f"| {label} | not run | |")
            continue
        cells, plain = recover[key]["0.4"], recover[base]["0.4"]
        seeds = sorted(set(cells) & set(plain))
        mean, _, _, n = recover_mean(key, "0.4")
        changes = ", ".join(f"{cells[s]['val_loss'] - plain[s]['val_loss']:+.4f}" for s in seeds)
        rows.append(f"| {label} | {mean:.4f} ({n} seeds) | {changes} |")
    return "\n".join(rows)


def yes(holds: bool) -> str:
    return "**yes**" if holds else "**no**"


@generated
def compress_goals_table() -> str:
    d = res("compress_trained.json")
    summary, recover = d["summary"], d["stages"]["recover"]
    exact = summary["compress"]["goal_exact_below_svd_and_asvd"]
    goals = summary["recover"]["goals"]
    means = goals["0.4"]["mean"]
    one_shot = min((m for m in means if not m.startswith("callback_")), key=means.get)
    callback = min((m for m in means if m.startswith("callback_progressive")), key=means.get)
    one, cb, dense = recover[one_shot]["0.4"], recover[callback]["0.4"], recover["dense_ft"]["1.0"]
    seeds = sorted(set(one) & set(cb) & set(dense))
    closed = [(one[s]["val_loss"] - cb[s]["val_loss"]) / (one[s]["val_loss"] - dense[s]["val_loss"]) for s in seeds]
    scratch = summary["scratch"]["0.4"]
    worst = max(scratch["recovered_mean"], key=scratch["recovered_mean"].get)
    speed = d["stages"]["inference"]["budget_0.4"]["speedup"]
    rows = [
        "| goal (3 seeds) | measured | met |",
        "|---|---|---|",
        "| right after compression, the exact one-shot below weight SVD and the ASVD-style fit at every kept fraction "
        f"| {', '.join(f'`{m}`' for m in exact)} at {' / '.join(pct(float(f)) for f in exact['exact_uniform']['below_svd_and_asvd_at'])} "
        f"| {yes(all(v['at_every_fraction'] for v in exact.values()))} |",
        "| at 40 % kept, the best callback schedule beats the best one-shot plus fine-tuning on every seed and closes "
        f"30 % of its gap to the fine-tuned dense model | `{callback}` against `{one_shot}`: gap closed "
        f"{', '.join(f'{100 * c:+.0f} %' for c in closed)} | {yes(all(c >= 0.3 for c in closed))} |",
    ]
    for f, limit in (("0.6", 0.01), ("0.4", 0.03)):
        best = goals[f]["best"]
        rows.append(f"| at {pct(float(f))} kept, within {pct(limit)} of the fine-tuned dense model | `{best['method']}`, worst "
                    f"seed {pct(best['worst_seed_vs_dense_ft'], 2)} above it | {yes(best['worst_seed_vs_dense_ft'] <= limit)} |")  # fmt: skip
    rows += [
        "| the compressed and recovered model beats the same-size dense model trained from scratch for the same steps "
        f"| the worst method at 40 % (`{worst}`) {scratch['recovered_mean'][worst]:.4f} against the from-scratch "
        f"model's best seed {scratch['scratch_val_loss_best']:.4f} | {yes(all(scratch['recovered_beat_scratch'].values()))} |",
        f"| at 40 % kept, inference at least 1.3x as fast as dense | {speed:.2f}x (batch 64, 1 thread, CPU) | {yes(speed >= 1.3)} |",
    ]
    return "\n".join(rows)


RECOVERY_LENGTHS = {120: "compress_trained.json", 192: "compress_trained_192steps.json"}


@generated
def compress_length_table() -> str:
    rows = [
        "| 40 % kept | " + " | ".join(f"{n} steps of recovery" for n in RECOVERY_LENGTHS) + " |",
        "|---" * (len(RECOVERY_LENGTHS) + 1) + "|",
    ]
    for key, fraction, label in (("exact_budget_params_ft", "0.4", "exact fit (`ParamBudget`), then fine-tuning"),
                                 ("callback_progressive", "0.4", "the callback, `progressive` (milestones at 0, 1/3, 2/3 of it; fresh optimizer state at each swap, the rule before)"),
                                 ("dense_ft", "1.0", "the trained dense model, fine-tuned")):  # fmt: skip
        cells = [recover_mean(key, fraction, name) for name in RECOVERY_LENGTHS.values()]
        rows.append(f"| {label} | " + " | ".join(f"{m:.4f} ({lo:.4f}-{hi:.4f}, {n} seeds)" for m, lo, hi, n in cells) + " |")
    gaps = []
    for name in RECOVERY_LENGTHS.values():
        recover = res(name)["stages"]["recover"]
        one, prog = recover["exact_budget_params_ft"]["0.4"], recover["callback_progressive"]["0.4"]
        gaps.append(", ".join(f"{prog[s]['val_loss'] - one[s]['val_loss']:+.4f}" for s in sorted(set(one) & set(prog))))
    rows.append("| progressive against compress-once, per seed | " + " | ".join(gaps) + " |")
    return "\n".join(rows)


@generated
def compress_inference_table() -> str:
    cells = res("compress_trained.json")["stages"]["inference"]
    rows = ["| structure | weights kept | forward, batch of 64 windows, 1 thread | against dense |", "|---|---|---|---|"]
    for key, label in (("budget_0.4", "`ParamBudget(0.4)` (as recovered)"), ("uniform_0.4", "uniform exact rank, 40 %"),
                       ("budget_0.6", "`ParamBudget(0.6)` (as recovered)"), ("uniform_0.6", "uniform exact rank, 60 %")):
        c = cells[key]
        rows.append(f"| {label} | {pct(c['kept_fraction'], 1)} | {c['compressed_ms']:.0f} ms (dense {c['dense_ms']:.0f} ms) "
                    f"| {c['speedup']:.2f}x ({c['speedup_min']:.2f}-{c['speedup_max']:.2f}x) |")  # fmt: skip
    return "\n".join(rows)


CNN_METHODS = {
    "exact_budget_ft": "exact fit (`ParamBudget`), then fine-tuning",
    "callback_switch0": "the callback, one switch at step 0",
    "callback_progressive": "the callback, `progressive` over steps 0 / 40 / 80, each swap's optimizer state fresh (the rule before)",
    "callback_progressive_carried": "the same, every new pair's optimizer state carried from what it replaces (the library's rule now)",
}


@generated
def cnn_recover_table() -> str:
    d = res("cnn_recover.json")
    summary = d["summary"]
    fractions = sorted({f for m in CNN_METHODS for f in summary.get(m, {})}, key=float, reverse=True)  # (not "goals")
    rows = [
        "| after 120 steps on 1,000 digits | " + " | ".join(f"{pct(float(f))} kept" for f in fractions) + " |",
        "|---" * (len(fractions) + 1) + "|",
    ]
    for key, label in CNN_METHODS.items():
        cells = [f"{summary[key][f]['loss_mean']:.4f} / {pct(summary[key][f]['accuracy_mean'], 2)}"
                 if f in summary.get(key, {}) else "not run" for f in fractions]  # fmt: skip
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    dense = summary["dense_ft"]["1.0"]
    rows.append(f"| the pretrained CNN, fine-tuned | {dense['loss_mean']:.4f} / {pct(dense['accuracy_mean'], 2)} |"
                + " |" * (len(fractions) - 1))  # fmt: skip
    return "\n".join(rows)


@generated
def readme_compress_trained() -> str:
    d = res("compress_trained.json")
    compress = d["stages"]["compress"]
    rows = [
        "| GPT trained 960 steps, 40 % of its projections' weights kept | right after compression | after 120 steps |",
        "|---|---|---|",
    ]
    for key, after, label in (
        ("svd", "svd_ft", "weight SVD (Composer's way), then fine-tuning"),
        ("exact_budget_params", "exact_budget_params_ft", "exact fit (`factorize_model`, `ParamBudget`), then fine-tuning"),
        (None, "callback_progressive_carried", "the callback, `progressive` over the recovery"),
    ):
        before = f"{compress[key]['0.4']['val_loss']:.3f}" if key else "-"
        mean, _, _, n = recover_mean(after, "0.4")
        rows.append(f"| {label} | {before} | {mean:.4f} |")
    mean, _, _, n = recover_mean("dense_ft", "1.0")
    rows.append(f"| the dense model, fine-tuned | {d['dense']['val_loss']:.3f} | {mean:.4f} |")
    scratch = d["summary"]["scratch"]["0.4"]
    rows.append(f"| a dense model of the compressed size, trained from scratch for the same 960 + 120 steps "
                f"| - | {scratch['scratch_val_loss']:.4f} ({len(scratch['scratch_val_loss_per_seed'])} seeds) |")
    return "\n".join(rows)


@generated
def collection_overhead_table() -> str:
    rows = [
        "| model | validation batches | with / without collection (glibc defaults) | the same, steady heap |",
        "|---|---|---|---|",
    ]
    for r in res("collection_overhead.json")["rows"]:
        steady = overhead("collection_overhead_steady_malloc.json", r["model"], r["batches"])
        rows.append(f"| {r['model'].upper()} | {r['batches']} | {r['ratio']:.2f}x | {steady:.2f}x |")
    return "\n".join(rows)


@generated
def ddp_sharded_table() -> str:
    d = res("ddp_scaling_sharded.json")
    rows = [
        "| processes N | solve CPU s per rank | x N / one-process work (same run; 1-process run) "
        "| statistics after the reduce per rank | factors vs all-reduce (max rel. diff) | ranks bit-identical |",
        "|---|---|---|---|---|---|",
    ]
    for run in d["runs"]:
        n = run["world"]
        per_rank = ", ".join(f"{r['sharded']['solve_cpu_s']:.2f}" for r in run["per_rank"])
        ratio = "-" if n == 1 else (f"{d['goals'][str(n)]['solve_ratio_times_world']:.2f}; "
                                    f"{d['goals'][str(n)]['solve_ratio_times_world_vs_1_process_run']:.2f}")  # fmt: skip
        rows.append(
            f"| {n} | {per_rank} | {ratio} | {run['statistics_bytes_sharded_max_rank'] / 2**20:.2f} MiB "
            f"| {run['max_rel_diff_sharded_vs_all_reduce']:g} | {'yes' if run['ranks_bit_identical'] else 'no'} |"
        )
    return "\n".join(rows)


@generated
def milestone_cost_table() -> str:
    d = res("milestone_cost_cpu.json")
    rows = ["| projection | layers | today's solver, CPU-s | the original, CPU-s | speedup |", "|---|---|---|---|---|"]
    for shape, s in d["by_shape"].items():
        rows.append(f"| {shape} | {s['layers']} | {s['current_s']:.1f} | {s['previous_s']:.1f} | {s['speedup']:.1f}x |")
    rows.append(
        f"| all | {d['layers_done']} | {d['current_seconds']:.1f} | {d['previous_seconds']:.1f} | **{d['speedup']:.2f}x** |"
    )
    return "\n".join(rows)


@generated
def gpt_lm_older() -> str:
    runs = res("gpt_lm.json")["runs"]
    labels = {
        "dense": "dense",
        "callback_1:0.25": "callback `{1: 0.25}`",
        "callback_1:0.5,2:0.25": "callback `{1: 0.5, 2: 0.25}`",
        "init_0.25": "factorized at initialization",
        "init_0.25_equal_time": "factorized at initialization, given the callback's time",
    }
    rows = [
        "| method | steps | whole `fit`, wall s | speed vs dense | final val loss | vs dense |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in labels.items():
        r = runs[key]
        rows.append(f"| {label} | {r['steps']} | {r['fit_seconds']:.0f} | {r['speedup_vs_dense']:.2f}x "
                    f"| {r['final_val_loss']:.3f} | {100 * r['loss_vs_dense']:+.1f} % |")  # fmt: skip
    return "\n".join(rows)


@generated
def gpt_lm_seeds_table() -> str:
    runs = res("gpt_lm_seeds.json")["runs"]
    labels = {"dense": "dense", "callback_1:0.25": "callback `{1: 0.25}`", "init_0.25": "factorized at initialization",
              "init_0.25_630": "factorized at initialization, 630 steps"}  # fmt: skip
    rows = ["| method | final val loss, seeds 0 / 1 / 2 | mean wall s |", "|---|---|---|"]
    for key, label in labels.items():
        seeds = runs[key]
        losses = " / ".join(f"{seeds[s]['final_val_loss']:.3f}" for s in sorted(seeds))
        rows.append(f"| {label} | {losses} | {statistics.mean(r['fit_seconds'] for r in seeds.values()):.0f} |")
    return "\n".join(rows)


@generated
def llm_statistics() -> str:
    """The table ``benchmarks/estimate_llm_statistics.py`` prints, made by that script's own ``table``."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from estimate_llm_statistics import table

    return table(res("llm_statistics_estimate.json"))


@generated
def llm_statistics_more() -> str:
    d = res("llm_statistics_estimate.json")
    rows = [
        "| shapes | copies of W (in the totals) | float32 cast of one block (transient, not in the totals) "
        "| one process, held-out halves and their union at peak |",
        "|---|---|---|---|",
    ]
    for name, m in d["models"].items():
        s = m["statistics_bytes"]
        rows.append(f"| {name} | {s['w_copies'] / 1e9:.1f} GB | {s['largest_transient_cast_bytes'] / 1e9:.2f} GB "
                    f"| {s['single_process_holdout_bytes'] / 1e9:.0f} GB |")  # fmt: skip
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# claims: numbers in prose, each written from its results field

Claim = tuple[str, Callable[[], str]]


def _gpu_md(text: str) -> str:
    """A number of the hand-recorded GPU notes (no JSON holds them): quoted only as that file writes it."""
    return _quoted(text, (RESULTS / "gpu_measurements_2026.md").read_text())


def _probe_cost() -> str:
    """The output probe's cost, in whole dense runs: the release defaults' time less the run without it."""
    extra = _lm_auto("callback_auto_release_defaults")["mean_time"] - _lm_auto("callback_auto_nmse_budget_latest_0.75")["mean_time"]
    return f"{extra / _lm_auto('dense')['mean_time']:.1f}x"


CLAIMS: dict[str, list[Claim]] = {
    "docs/benchmarks.md": [
        ("lm auto: the probe's cost", lambda: f"cost about {_probe_cost()} a whole dense run"),
        ("lm auto: the machine", lambda: "about {:.1f}x as fast".format(lm("dense")["mean_time"] / _lm_auto("dense")["mean_time"])),
        ("lm auto: latest 0.5", lambda: "at 0.5 this run gets {:.2f}x as fast and ends {:.1f} % above dense".format(
            _lm_auto("callback_auto_nmse_budget_latest_0.5")["mean_speed_vs_dense"],
            100 * _lm_auto("callback_auto_nmse_budget_latest_0.5")["mean_loss_vs_dense_equal_steps"])),
        (
            "accuracy: init at a half",
            lambda: f"factorizing at initialization loses {-acc_row('init', 0.625)['diff_vs_dense_mean']:.1f} points",
        ),
        (
            "solver: worst NMSE ratio",
            lambda: (
                f"at worst {res('solver.json')['goals']['nmse_never_above_composer']['worst_ours_over_composer']:.2f} of Composer's"
            ),
        ),
        (
            "solver: rcond diagnostic",
            lambda: "Composer's NMSE {:.3f} against ours {:.3f}".format(
                res("solver.json")["composer_rcond_diagnostic"]["composer_stock_nmse_measured"],
                res("solver.json")["composer_rcond_diagnostic"]["ours_nmse_measured"],
            ),
        ),
        (
            "lm: budget vs dense at equal time",
            lambda: (
                f"{-100 * lm('callback_budget_macs_1:0.25')['mean_loss_vs_dense_equal_time']:.1f} % below dense given the same time"
            ),
        ),
        (
            "lm: budget vs init at equal time",
            lambda: (
                f"{-100 * lm('callback_budget_macs_1:0.25')['mean_loss_vs_init_equal_time']:.1f} % below factorizing at initialization"
            ),
        ),
        (
            "lm: late budget equal steps",
            lambda: "within {:.1f} % of dense at equal steps, {:.2f}x as fast".format(
                100 * lm("callback_late_budget_macs_3:0.25")["mean_loss_vs_dense_equal_steps"],
                lm("callback_late_budget_macs_3:0.25")["mean_speed_vs_dense"],
            ),
        ),
        (
            "lm: re-warm",
            lambda: (
                f"{lm('callback_early_1:0.25')['mean_final_val_loss']:.4f} with the re-warm, {lm('exp_early_no_rewarm')['mean_final_val_loss']:.4f} without"
            ),
        ),
        (
            "lm: lr grid",
            lambda: "best for dense, for factorizing at initialization and for the callback alike: {}".format(
                " / ".join(sorted(set(res("lm_lr_grid.json")["best"].values())))
            ),
        ),
        (
            "auto: final ranks",
            lambda: "same ranks ({})".format(
                " / ".join(
                    "dense" if r is None else str(r) for r in res("auto_schedule.json")["summary"][0]["ranks"].values()
                )
            ),
        ),
        (
            "auto: conv stable ranks",
            lambda: "between {:.1f} and {:.1f} while".format(*auto_stable_ranks("features.2", "features.5")),
        ),
        (
            "auto: fc stable ranks",
            lambda: "between {:.1f} and {:.1f} (within room".format(*auto_stable_ranks("classifier.0")),
        ),
        (
            "auto: guard on",
            lambda: "measured {:.2f}-{:.2f}x the speed before".format(
                min(auto_guard_on_speedups()), max(auto_guard_on_speedups())
            ),
        ),
        (
            "solver: 20x goal",
            lambda: "The goal of 20x through `factorize_matrix` from 10^5 rows on is {}".format(
                "met" if res("solver.json")["goals"]["speedup_20x_at_N_ge_1e5"]["met"] else "not met"
            ),
        ),
        ("solver: streaming reaches 20x", lambda: f"reaches it from {power_of_ten(streaming_20x_from())} rows"),
        ("lm: cpu time noise", lambda: _quoted("~5-10 %", res("lm_tradeoff.json")["setup"]["note"])),
        ("auto: LM switches", lambda: "switched at epoch {}".format(" / ".join(str(e) for e in lm_auto_switches()))),
        (
            "auto: LM watch cost",
            lambda: "max {}, median {}; {:.0f}-{:.0f} ms per run".format(
                pct(lm_auto_watch()["max"], 1),
                pct(lm_auto_watch()["median"], 1),
                lm_auto_watch()["ms_low"],
                lm_auto_watch()["ms_high"],
            ),
        ),
        (
            "auto: LM auto loss",
            lambda: (
                f'`"auto"` ends at {lm("callback_auto")["mean_final_val_loss"]:.3f} in {lm("callback_auto")["mean_time"]:.0f} CPU-s'
            ),
        ),
        (
            "ddp: accuracy",
            lambda: "{:+.1f} ± {:.1f} points".format(
                res("ddp_scaling.json")["training"]["verdict"]["acc_diff_mean_pp"],
                res("ddp_scaling.json")["training"]["verdict"]["acc_diff_std_pp"],
            ),
        ),
        (
            "ddp: all-reduce",
            lambda: (
                f"{1000 * res('ddp_scaling.json')['training']['per_world']['procs2']['milestone_all_reduce_s_mean']:.0f} ms per milestone"
            ),
        ),
        (
            "ddp: goals",
            lambda: "are met for N = {}".format(
                " and ".join(n for n, g in res("ddp_scaling_sharded.json")["goals"].items() if g["all_met"])
            ),
        ),
        ("milestone: wall", lambda: f"{res('milestone_cost_cpu.json')['speedup_wall']:.1f}x on the wall clock"),
        (
            "milestone: nmse",
            lambda: "fitted {}, installed {}, held-out {} relative".format(
                *(
                    sci(res("milestone_cost_cpu.json")["max_relative_nmse_difference_by_kind"][k], d)
                    for k, d in (("fitted", 0), ("installed", 0), ("heldout", 1))
                )
            ),
        ),
        (
            "milestone: held-out count",
            lambda: "({} held-out values compared, {} undetermined".format(
                res("milestone_cost_cpu.json")["heldout_values_compared"],
                res("milestone_cost_cpu.json")["heldout_values_undetermined"],
            ),
        ),
        (
            "gpt older: goals",
            lambda: (
                f"{res('gpt_lm.json')['summary']['speedup_vs_dense']:.2f}x faster than dense, {100 * res('gpt_lm.json')['summary']['loss_vs_dense']:+.1f} %"
            ),
        ),
    ],
    "README.md": [
        (
            "compress trained: inference at 40 %",
            lambda: "runs its forward pass {:.2f}x as fast as dense at {} kept".format(
                res("compress_trained.json")["stages"]["inference"]["budget_0.4"]["speedup"],
                pct(res("compress_trained.json")["stages"]["inference"]["budget_0.4"]["kept_fraction"]),
            ),
        ),
    ],
    "docs/oneshot.md": [
        (
            "oneshot: from scratch",
            lambda: "ends at {:.4f} ({:.4f}-{:.4f} over {} seeds)".format(
                (s := res("compress_trained.json")["summary"]["scratch"]["0.4"])["scratch_val_loss"],
                min(s["scratch_val_loss_per_seed"].values()),
                max(s["scratch_val_loss_per_seed"].values()),
                len(s["scratch_val_loss_per_seed"]),
            ),
        ),
        (
            "oneshot: example",
            lambda: "from {} to {}".format(
                pct(res("pretrained_mnist.json")["dense_accuracy"], 2),
                pct(pretrained_row(0.2)["budget"]["accuracy"], 2),
            ),
        ),
    ],
    "docs/speed.md": [
        ("gpu: host-bound", lambda: _gpu_md("1.1-1.7 ms")),
        ("gpu: whole model", lambda: _gpu_md("1.40x")),
        (
            "speed: stability",
            lambda: "gave {} different structures with the old rule and {} with the new".format(
                *[c["distinct_structures"] for c in res("decision_stability.json")["cells"] if c["load"]]
            ),
        ),
        (
            "speed: rounds",
            lambda: "decide in {} rounds".format(
                max(c["rounds_min_median_max"][2] for c in res("decision_stability.json")["cells"] if c["code"] == "after")
            ),
        ),
    ],
    "docs/when-not.md": [
        (
            "when-not: small dense",
            lambda: "{:.3f} in {:.0f} CPU-s".format(
                lm("small_dense_d152")["mean_final_val_loss"], lm("small_dense_d152")["mean_time"]
            ),
        ),
        (
            "when-not: budget",
            lambda: "{:.3f} in {:.0f} CPU-s".format(
                lm("callback_budget_macs_1:0.25")["mean_final_val_loss"], lm("callback_budget_macs_1:0.25")["mean_time"]
            ),
        ),
        (
            "when-not: small dense at the callback's time",
            lambda: "trained for that time reaches {:.3f}".format(
                lm("callback_budget_macs_1:0.25")["mean_small_dense_at_equal_time"]
            ),
        ),
        (
            "when-not: small dense at each schedule's time",
            lambda: "loss is {} to {} above it, on every seed".format(
                pct(min(lm(m)["mean_loss_vs_small_dense_equal_time"] for m in LM_CALLBACK_ROWS), 1),
                pct(max(lm(m)["mean_loss_vs_small_dense_equal_time"] for m in LM_CALLBACK_ROWS), 1),
            ) if small_wins_every_seed() else "loss is above it on some seeds only",
        ),
        (
            "when-not: narrow train",
            lambda: f"train at {speed_row(64)['training']['unguarded']['speedup_vs_dense']:.2f}x",
        ),
        (
            "when-not: narrow infer",
            lambda: f"infer at {speed_row(64)['inference']['unguarded']['speedup_vs_dense']:.2f}x",
        ),
    ],
}

# Numbers in the guarded pages that are settings or definitions, not measurements.
SETTINGS: dict[str, set[str]] = {
    "README.md": {"2.13", "3.10"},  # the torch version the tests ran on; the Python floor
    # the rank fraction f of the auto benchmark; the older LM's corpus; issue 23's goals (1.3/N, 1.2/N)
    "docs/benchmarks.md": {"0.625", "4 MB", "1.3", "1.2"},
}

MEASURED = re.compile(
    r"(?<![\w.\-/])(?:\d[\d,]*(?:\.\d+)?\s?(?:x|%|s|ms|MiB|GiB|GB|MB|CPU-s|points?|nats)(?!\w)|\d[\d,]*\.\d+(?![.\d]))"
)


def flat(text: str) -> str:
    """Whitespace and line breaks as single spaces: a claim may be wrapped anywhere in the page."""
    return re.sub(r"\s+", " ", text)


def strip_unchecked_spans(text: str, claimed: list[str]) -> str:
    text = BLOCK.sub("", text)
    text = flat(re.sub(r"<!--.*?-->", "", text, flags=re.S))
    for snippet in claimed:
        text = text.replace(snippet, "")
    text = re.sub(r"```.*?```", "", text)
    text = re.sub(r"`[^`]*`", "", text)
    return re.sub(r"\]\([^)]*\)", "]", text)  # link targets


# ---------------------------------------------------------------------------------------------
# the tests


def test_generated_blocks_are_what_the_results_give():
    seen = set()
    for page in pages():
        for _, name, body, _ in BLOCK.findall(page.read_text()):
            assert name in GENERATORS, f"{rel(page)}: no generator {name!r} in tests/test_docs_numbers.py"
            seen.add(name)
            assert body == GENERATORS[name]() + "\n", (
                f"{rel(page)}: the block {name!r} differs from benchmarks/results/; "
                "run `python tests/test_docs_numbers.py --write`"
            )
    assert seen == set(GENERATORS), f"generators no page uses: {set(GENERATORS) - seen}"
    assert "readme_results" in {m[1] for m in BLOCK.findall((ROOT / "README.md").read_text())}


def test_prose_numbers_are_the_results_fields():
    for page, claims in CLAIMS.items():
        text = flat((ROOT / page).read_text())
        for what, make in claims:
            assert make() in text, f"{page}: {what}: expected the text {make()!r}"


def test_no_measured_number_in_the_readme_or_the_benchmark_page_goes_unchecked():
    for page in GUARDED:
        claimed = [make() for _, make in CLAIMS.get(page, [])]
        text = strip_unchecked_spans((ROOT / page).read_text(), claimed)
        found = {m.group(0).replace("\u00a0", " ") for m in MEASURED.finditer(text)}
        unchecked = sorted(found - SETTINGS[page])
        assert SETTINGS[page] <= found, f"{page}: settings listed but not in the page: {SETTINGS[page] - found}"
        assert not unchecked, (
            f"{page}: numbers that look measured but are neither generated nor claimed in "
            f"tests/test_docs_numbers.py (nor listed as settings): {unchecked}"
        )


def test_the_guard_sees_a_stray_number():
    assert MEASURED.findall("dense 2.318 in 225 s, 1.83x, 49 %, 3 seeds, 111.7 MiB") == [
        "2.318", "225 s", "1.83x", "49 %", "111.7 MiB"]  # fmt: skip
    assert (
        strip_unchecked_spans("`0.25` [a](b/1.5x.png) <!-- generated: x -->\n1.2\n<!-- /generated --> ok", [])
        == " [a] ok"
    )
    assert strip_unchecked_spans("as fast: 1.30x\n as  written", ["1.30x as written"]) == "as fast: "
    assert MEASURED.findall("Composer 0.32.1, torch 2.13") == ["2.13"]
    assert power_of_ten(300_000) == "3·10^5" and power_of_ten(1_000_000) == "1·10^6"
    assert sci(8.6e-11) == "9e-11" and sci(1.135e-8, 1) == "1.1e-8"


def write() -> None:
    """Rewrite every generated block from the results files."""
    for page in pages():
        text = page.read_text()
        new = BLOCK.sub(lambda m: m.group(1) + GENERATORS[m.group(2)]() + "\n" + m.group(4), text)
        if new != text:
            page.write_text(new)
            print(f"rewrote {rel(page)}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    else:
        print(__doc__)
