"""Validation loss against whole-``fit`` time for the GPT byte-level LM on the whole standard library
(``examples/gpt_task.stdlib_tree``, split by file): does the callback buy a better model for the
time spent? (issue 21)

    python benchmarks/bench_lm_tradeoff.py [--seeds 0 1 2] [--steps 240]      # CPU configuration
    python benchmarks/bench_lm_tradeoff.py --gpu [--budget-s 330]             # GPU configuration
    python benchmarks/bench_lm_tradeoff.py --dry-run [--gpu]                  # tiny, CPU, seconds (tested)
    python benchmarks/bench_lm_tradeoff.py --merge a.json b.json ...         # seeds run as separate processes

A seed's work can be split over processes: ``--methods`` runs some rows of the table, ``--compressed
120 180`` only dense compressed to those step counts, ``--resume FILE`` counts a file's runs as done,
``--frontier 0`` skips the automatic compressed runs, ``--small-for none`` the smaller dense model's
longer runs; ``--merge`` then joins the files run by run (a merged file keeps its earlier
``merged_from`` and ``note``, the new ones appended).

Per seed, in order: every row of ``METHODS`` (dense; factorized at initialization; a smaller dense
model with about the multiply-adds of the factorized one; the callback at several schedules; the
item-3 experiments, seed 0 only), then **dense with its LR schedule compressed** (fewer steps,
the same warm-up + cosine shape, the same number of epochs and validation runs) to end at the
fastest and the slowest other method's time (``--frontier`` points spread between them): with the
full dense run these trace dense's own loss-vs-time curve, read by linear interpolation at each
method's time ("dense at equal time"; a method faster than dense's shortest run is compared with
that run, which had more time). Last, factorized at initialization given as many steps as fit
in the fastest callback run's time: with its full run, the two trace init's own loss-vs-time
curve ("init at equal time"; a callback run slower than init's full run is compared with init's
full run, which had less time).

Last, **the smaller dense model at each callback run's time** (issue 30 item 5: the same final
multiply-adds *and* the same time): the smaller dense model trained for more steps, its LR schedule
stretched the same way (the same warm-up + cosine shape over the new step count, the same number of
epochs and validation runs), one run per callback row of ``--small-for`` (default: every callback
row of the table but the ``exp_`` experiments), rows whose mean times lie within 2 % of each other
sharing one run (``--small-steps`` adds step counts, e.g. one past the slowest row on every seed).
The step count comes from the rows' mean time over the seeds present and the smaller model's
240-step run, with a fixed per-run cost (validation, setup) that does not grow with the
steps: its share of a run, the intercept of time against steps over dense's own runs of several
lengths. With the 240-step run these trace the smaller model's loss-vs-time curve, read by linear
interpolation at every callback run's own time ("small dense at equal time"; a callback run slower
than the smaller model's longest run is compared with that run, which had less time, and one faster
than its shortest with that one, which had more; ``small_dense_equal_time_outside_range`` marks
both).

CPU time is one machine's in one session: the same run measured on another day (another virtual
machine, other neighbours on its cores) can take a different CPU time (2.5x less, the afternoon the
smaller model's longer runs were made). ``--rerun ROW ...`` runs those rows again in the current
process (``<row>_rerun``, the same seed and steps): the smaller dense model's rerun puts its longer
runs, made in that session, on the table's time scale (times multiplied by its full run's time over
the rerun's; seeds without a rerun take the mean of the others' factors), and a callback row's rerun
checks that the factor is the same for a factorized model (``summary.reruns``: time ratios and losses,
which repeat to the digit when the code has not changed).

Learning rate: every method trains at the peak rate ``bench_lm_lr_grid.py`` found best for dense,
factorized at init and the callback alike (CPU: 1e-3; results before that grid used 3e-3, where
dense ends 0.40 nats higher and smaller or factorized models looked better than they are).

Time: the whole ``trainer.fit`` (validation, statistics collection, solves, the speed decision
included), both wall-clock and this process's CPU time (``time.process_time``). The CPU
configuration runs one torch thread on a shared machine whose load changes under it, so its time
axis is CPU time; the GPU configuration's is wall-clock. ``setup.time_axis`` says which.

The method list is a table of configurations (``Method``): a new schedule is one more row.
Writes ``lm_tradeoff.json`` (after every run, so a killed run keeps what it finished) and
``lm_tradeoff.png`` (loss vs seconds, one line per method, mean over seeds) under ``--out``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import copy
import dataclasses
import itertools
import json
import math
import platform
import statistics
import time
import traceback
from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
import torch

from benchmarks._common import package_version
from examples.gpt_task import VOCAB, stdlib_tree
from examples.gpt_train import run
from factorize_plugin import Auto, ParamBudget, Readiness, Targets

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_LOSS, GOAL_SPEED = 0.02, 1.25  # at equal steps: within 2 % of dense, >= 1.25x faster (issue 21)
FRACTION = 0.25  # the factorized runs' final rank fraction, and the smaller dense model's MAC target
# Peak learning rates (AdamW, warm-up + cosine). CPU: the best of bench_lm_lr_grid.py's grid
# (results/lm_lr_grid.json, seed 0) for dense, factorized at init and the callback alike; GPU: not
# tuned (no GPU lent), the usual rate for a ~100 M-parameter GPT at this batch size.
LR_CPU, LR_GPU = 1e-3, 3e-4


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the trade-off table. ``schedule`` None is dense; ``model`` overrides the
    configuration's model (a smaller dense one); ``callback`` is passed to ``LowRankFactorization``
    (its defaults otherwise: the learning-rate re-warm after a swap included); ``first_seed_only`` marks an experiment (item 3) measured on seed 0 only; ``expect`` is the run's
    expected share of the dense run's time (the ``--budget-s`` guard's estimate)."""

    name: str
    schedule: Optional[Union[dict[int, Any], str]] = None
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    callback: dict[str, Any] = dataclasses.field(default_factory=dict)
    first_seed_only: bool = False
    expect: float = 1.0
    kind: str = "callback"


SMALL_MERGE = 0.02  # callback rows whose mean times lie this close share one longer small-dense run


def methods(cfg: dict[str, Any]) -> list[Method]:
    """The table, for a configuration (the smaller dense width and the block names depend on it)."""
    layers = cfg["model"]["layers"]
    ends = [f"net.blocks.{i}.*" for i in (0, layers - 1)]
    small = dict(dim=matching_dim(cfg["model"], FRACTION))
    return [
        Method("dense", None, kind="dense"),
        Method("init_0.25", {0: FRACTION}, expect=0.55, kind="init"),
        Method(f"small_dense_d{small['dim']}", None, model=small, expect=0.5, kind="small_dense"),
        Method("callback_early_1:0.25", {1: FRACTION}, expect=0.65),
        Method("callback_late_3:0.25", {3: FRACTION}, expect=0.8),
        Method("callback_gradual_1:1/2,2:1/3,3:1/4", {1: 0.5, 2: 1 / 3, 3: FRACTION}, expect=0.8),
        # per-layer ranks from each layer's exact NMSE curve under one multiply-add budget (no extra passes)
        Method("callback_budget_macs_1:0.25", {1: ParamBudget(FRACTION, metric="macs", sensitivity=False)}, expect=0.65),
        Method("callback_late_budget_macs_3:0.25", {3: ParamBudget(FRACTION, metric="macs", sensitivity=False)}, expect=0.8),
        Method("callback_auto", Auto(target=FRACTION), expect=0.7),  # issue 22: no milestone given
        # issue 30 item 5: schedule="auto" as a new user writes it, with the defaults of its release
        # (ParamBudget(0.5, metric="macs"), whose output probe runs at the switch; Readiness(latest=0.75)),
        # and with the candidate defaults: the same budget allocated by the layers' NMSE alone, latest 0.5
        Method("callback_auto_release_defaults", Auto(target=ParamBudget(0.5, metric="macs"), readiness=Readiness(latest=0.75)),
               first_seed_only=True, expect=4.0),
        Method("callback_auto_nmse_budget_latest_0.75",
               Auto(target=ParamBudget(0.5, metric="macs", sensitivity=False), readiness=Readiness(latest=0.75)),
               expect=0.95),
        Method("callback_auto_nmse_budget_latest_0.5",
               Auto(target=ParamBudget(0.5, metric="macs", sensitivity=False), readiness=Readiness(latest=0.5)),
               expect=0.85),
        # item 3: the early schedule with one change each (the re-warm's own row measures its default)
        Method("exp_early_no_rewarm", {1: FRACTION}, callback=dict(rewarm_steps=0), expect=0.65),
        Method("exp_early_ends_dense", {1: FRACTION}, callback=dict(targets=Targets(exclude=ends)), first_seed_only=True, expect=0.7),
        # the budget spent by the network's measured output error: 8 probe ranks x 16 layers of forward
        # passes on the validation batch (16x a training batch on the CPU configuration): seed 0, last
        Method("exp_budget_macs_probed", {1: ParamBudget(FRACTION, metric="macs")}, first_seed_only=True, expect=4.0),
    ]


def config(gpu: bool, dry_run: bool, steps: Optional[int]) -> dict[str, Any]:
    if gpu:
        model = dict(dim=1024, layers=8, heads=16, block=512, batch_size=32, val_windows=256, corpus="full", lr=LR_GPU)
        cfg = dict(model=model, steps=792, epochs=6, trainer=dict(accelerator="gpu", precision="bf16-mixed"),
                   time_axis="seconds", budget_s=330.0, dense_seconds_planned=28.0)  # fmt: skip
    else:
        model = dict(dim=256, layers=4, heads=4, block=64, batch_size=16, val_windows=256, corpus="full", lr=LR_CPU)
        cfg = dict(model=model, steps=240, epochs=6, trainer={}, time_axis="cpu_seconds", budget_s=None,
                   dense_seconds_planned=200.0)  # fmt: skip
    if dry_run:
        cfg["model"] = dict(dim=32, layers=3, heads=2, block=16, batch_size=4, val_windows=16, corpus="full")
        cfg.update(steps=12, trainer=dict(accelerator="cpu", precision=cfg["trainer"].get("precision", "32-true")),
                   dense_seconds_planned=5.0)  # fmt: skip
    if steps is not None:
        cfg["steps"] = steps
    cfg["steps"] -= cfg["steps"] % cfg["epochs"]
    return cfg


def macs_per_token(dim: int, layers: int, block: int, rank_fraction: Optional[float] = None) -> float:
    """Multiply-adds per token of ``examples/gpt_task.GPT``: the block projections (dense, or every
    one factorized at ``rank_fraction`` of its min(in, out) = dim), the attention (T x d for QK^T and
    AV together at the causal mean length T/2) and the tied head."""
    if rank_fraction is None:
        projections = 12 * dim * dim
    else:  # rank r: r (in + out) for qkv (d->3d), proj (d->d), fc (d->4d), proj (4d->d)
        projections = round(rank_fraction * dim) * dim * (4 + 2 + 5 + 5)
    return layers * (projections + block * dim) + VOCAB * dim


def matching_dim(model: dict[str, Any], fraction: float) -> int:
    """The width (a multiple of the head count) whose dense model has about the multiply-adds per
    token of ``model`` with every projection factorized at ``fraction``."""
    target = macs_per_token(model["dim"], model["layers"], model["block"], fraction)
    step = model["heads"]
    widths = range(step, model["dim"] + 1, step)
    return min(widths, key=lambda d: abs(macs_per_token(d, model["layers"], model["block"]) - target))


def fit(method: Method, cfg: dict[str, Any], seed: int, steps: Optional[int] = None) -> dict[str, Any]:
    schedule = copy.deepcopy(method.schedule)  # a policy holds its last plan: one instance per run
    model = {**cfg["model"], **method.model}
    r = run(schedule, steps or cfg["steps"], cfg["epochs"], seed=seed, model=model, callback=method.callback or None,
            trainer=cfg["trainer"] or None)  # fmt: skip
    r["method"] = method.name
    r["kind"] = method.kind
    r["model_kwargs"] = model
    r["macs_per_token"] = achieved_macs(model, r["ranks"])
    r["changed_layers"] = sum(1 for v in r["ranks"].values() if v is not None)
    r.pop("metrics", None)
    for h in r.get("history", []):  # keep the history's small parts
        for key in ("samples", "heldout_nmse", "speed_trials"):
            h.pop(key, None)
    return r


def achieved_macs(model: dict[str, Any], ranks: dict[str, Optional[int]]) -> float:
    """Multiply-adds per token of the run's final structure (``ranks``: layer -> rank or None)."""
    d, layers, block = model["dim"], model["layers"], model["block"]
    shapes = {"attn.qkv": (d, 3 * d), "attn.proj": (d, d), "mlp.fc": (d, 4 * d), "mlp.proj": (4 * d, d)}
    total = macs_per_token(d, layers, block)
    for name, rank in ranks.items():
        if rank is None:
            continue
        i, o = next(shape for key, shape in shapes.items() if name.endswith(key))
        total -= i * o - rank * (i + o)
    return float(total)


def time_scales(result: dict[str, Any]) -> dict[str, float]:
    """Per seed, the factor that puts the smaller dense model's longer runs on the table's time scale:
    its full run's time over that run's ``_rerun`` (made in the longer runs' session); the mean of the
    seeds that have one for those that do not; 1 when none has."""
    axis = result["setup"]["time_axis"]
    found = {}
    for seed, runs in result["runs"].items():
        small = next((k for k, r in runs.items() if r["kind"] == "small_dense"), None)
        if small is not None and f"{small}_rerun" in runs:
            found[seed] = t_of(runs[small], axis) / t_of(runs[f"{small}_rerun"], axis)
    default = statistics.fmean(found.values()) if found else 1.0
    return {seed: found.get(seed, default) for seed in result["runs"]}


def t_scaled(r: dict[str, Any], axis: str, scale: float) -> float:
    """A run's time on the table's scale (only the smaller model's longer runs are rescaled)."""
    return t_of(r, axis) * (scale if r["kind"] == "small_dense_equal_time" else 1.0)


def fixed_share(result: dict[str, Any], axis: str) -> float:
    """The share of a full-length run's time that does not grow with its steps (validation, setup):
    the intercept of a least-squares line of time (each seed's as a share of its full dense run)
    against steps, over dense's runs of several lengths; 0 without two lengths, clamped to [0, 0.5]."""
    points = []
    for runs in result["runs"].values():
        dense = runs.get("dense")
        if dense is not None:
            points += [(r["steps"], t_of(r, axis) / t_of(dense, axis)) for r in runs.values() if r["kind"] in ("dense", "dense_compressed")]
    if len({x for x, _ in points}) < 2:
        return 0.0
    mx, my = statistics.fmean(x for x, _ in points), statistics.fmean(y for _, y in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    full = max(x for x, _ in points)
    intercept = my - slope * mx
    return min(max(intercept / (intercept + slope * full), 0.0), 0.5)


def small_dense_plan(result: dict[str, Any], cfg: dict[str, Any]) -> dict[int, list[str]]:
    """Step count -> the callback rows whose time the smaller dense model's longer run is to match:
    each row's mean time over the seeds present, rows within ``SMALL_MERGE`` of each other sharing a
    run; the step count from the smaller model's mean full-run time less its fixed share
    (``fixed_share``), rounded to whole epochs. Rows faster than the smaller model's full run get none."""
    axis, table = cfg["time_axis"], methods(cfg)
    small = next(m.name for m in table if m.kind == "small_dense")
    wanted = cfg["small_for"]
    if wanted is None:
        wanted = [m.name for m in table if m.kind == "callback" and not m.name.startswith("exp_")]
    seeds = [runs for runs in result["runs"].values() if small in runs]
    if not seeds:
        return {}
    t_small = statistics.fmean(t_of(runs[small], axis) for runs in seeds)
    targets = sorted((statistics.fmean(t_of(runs[row], axis) for runs in seeds if row in runs), row)
                     for row in wanted if any(row in runs for runs in seeds))  # fmt: skip
    groups: list[list[tuple[float, str]]] = []
    for t, row in targets:
        if groups and t <= groups[-1][0][0] * (1 + SMALL_MERGE):
            groups[-1].append((t, row))
        else:
            groups.append([(t, row)])
    fixed = fixed_share(result, axis) * t_small
    per_step = (t_small - fixed) / cfg["steps"]
    plan: dict[int, list[str]] = {}
    for group in groups:
        t = statistics.fmean(x for x, _ in group)
        steps = round((t - fixed) / per_step / cfg["epochs"]) * cfg["epochs"]
        if steps > cfg["steps"]:
            plan.setdefault(steps, []).extend(row for _, row in group)
    return plan


def t_of(r: dict[str, Any], axis: str) -> float:
    return r["fit_cpu_seconds"] if axis == "cpu_seconds" else r["fit_seconds"]


def interpolate(points: list[tuple[float, float]], t: float) -> Optional[float]:
    """Linear interpolation of (time, loss) points at ``t``; None outside their range."""
    points = sorted(points)
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if t0 <= t <= t1:
            return l0 + (l1 - l0) * (t - t0) / max(t1 - t0, 1e-12)
    return points[0][1] if len(points) == 1 and abs(points[0][0] - t) < 1e-9 else None


class Budget:
    """Skips what would end after ``budget_s`` (the GPU run's 6-minute limit); None: no limit."""

    def __init__(self, budget_s: Optional[float], dense_planned: float) -> None:
        self.budget_s, self.dense, self.start, self.over = budget_s, dense_planned, time.perf_counter(), False

    def allows(self, share: float) -> tuple[bool, str]:
        if self.budget_s is None:
            return True, ""
        elapsed = time.perf_counter() - self.start
        estimate = 1.15 * share * self.dense
        if self.over or elapsed + estimate > self.budget_s:
            self.over = True
            return False, f"budget: {elapsed:.0f} s elapsed + ~{estimate:.0f} s estimated > --budget-s {self.budget_s:.0f}"
        return True, ""


def run_seed(seed: int, first: bool, cfg: dict[str, Any], result: dict[str, Any], budget: Budget, save: Callable) -> None:
    axis = cfg["time_axis"]
    runs = result["runs"].setdefault(str(seed), {})

    def attempt(key: str, method: Method, share: float, steps: Optional[int] = None) -> Optional[dict[str, Any]]:
        if key in runs:  # done by an earlier process (--resume)
            return runs[key]
        if cfg.get("deadline") and time.strftime("%H:%M", time.gmtime()) >= cfg["deadline"]:
            result["skipped"][f"{seed}/{key}"] = f"--deadline {cfg['deadline']} UTC passed"
            print(f"seed {seed} {key}: skipped (--deadline {cfg['deadline']} UTC passed)", flush=True)
            return None
        ok, why = budget.allows(share)
        if not ok:
            result["skipped"][f"{seed}/{key}"] = why
            print(f"seed {seed} {key}: skipped ({why})", flush=True)
            return None
        try:
            r = runs[key] = fit(method, cfg, seed, steps)
        except Exception as exc:  # recorded; the other runs still count
            result["errors"][f"{seed}/{key}"] = {"error": repr(exc), "traceback": traceback.format_exc()}
            print(f"seed {seed} {key}: FAILED {exc!r}", flush=True)
            save()
            return None
        if key == "dense":
            budget.dense = r["fit_seconds"]
        print(f"seed {seed} {key:>40}: {r['steps']:4d} steps, {r['fit_seconds']:7.1f} s wall, {r['fit_cpu_seconds']:7.1f} s CPU, "
              f"val loss {r['final_val_loss']:.4f}", flush=True)  # fmt: skip
        save()
        return r

    if cfg["only"] is None:  # the item-3 experiments on the first seed; --methods names rows for any seed
        table = [m for m in methods(cfg) if first or not m.first_seed_only]
    else:
        table = [m for m in methods(cfg) if m.name in cfg["only"]]
    for m in table:
        attempt(m.name, m, m.expect)
    dense = runs.get("dense")
    if dense is None:
        return
    others = [r for k, r in runs.items() if k != "dense" and not k.startswith(("dense_", "init_equal")) and r["kind"] not in ("small_dense_equal_time", "rerun")]
    shares = sorted(t_of(r, axis) / t_of(dense, axis) for r in others)
    done = sum(1 for r in runs.values() if r["kind"] == "dense_compressed")
    if shares and done < cfg["frontier"]:  # dense compressed: --frontier points spread over the other methods' times
        lo, hi = max(shares[0], 0.1), min(shares[-1], 1.0)
        n = cfg["frontier"]
        fractions = [lo + (hi - lo) * i / max(n - 1, 1) for i in range(n)] if hi > lo else [lo]
        for f in sorted(set(round(f, 3) for f in fractions)):
            steps = max(cfg["epochs"], round(f * cfg["steps"] / cfg["epochs"]) * cfg["epochs"])
            if steps < cfg["steps"]:
                attempt(f"dense_{steps}", Method("dense", None, kind="dense_compressed"), f, steps)
    callbacks = {k: r for k, r in runs.items() if r["kind"] == "callback"}
    init = runs.get("init_0.25")
    if callbacks and init is not None:  # factorized at initialization, given the fastest callback run's time
        best = min(callbacks, key=lambda k: t_of(callbacks[k], axis))
        share = t_of(callbacks[best], axis) / t_of(init, axis)
        steps = max(cfg["epochs"], round(share * cfg["steps"] / cfg["epochs"]) * cfg["epochs"])
        init_method = next(m for m in methods(cfg) if m.name == "init_0.25")
        r = attempt("init_equal_time", dataclasses.replace(init_method, kind="init_equal_time"), share * init_method.expect, steps)
        if r is not None:
            r["matched_to"] = best
    small = next(m for m in methods(cfg) if m.kind == "small_dense")
    if small.name not in runs or (cfg["small_for"] is not None and not cfg["small_for"]):
        return
    for name in cfg["rerun"] or ():  # the same run again, in this session: its time against the table's
        again = next(m for m in methods(cfg) if m.name == name)
        r = attempt(f"{name}_rerun", dataclasses.replace(again, kind="rerun"), again.expect, runs[name]["steps"] if name in runs else None)
        if r is not None:
            r["rerun_of"] = name
    if cfg.get("small_plan") is None:  # once per process: every seed's runs get the same step counts
        cfg["small_plan"] = small_dense_plan(result, cfg)
        for steps in cfg.get("small_steps") or ():  # --small-steps: matched to no row (e.g. past the slowest)
            cfg["small_plan"].setdefault(steps - steps % cfg["epochs"], [])
        print(f"small dense at the callback rows' times: {cfg['small_plan']}", flush=True)
    for steps, rows in sorted(cfg["small_plan"].items()):
        share = steps / cfg["steps"] * small.expect
        r = attempt(f"{small.name}_{steps}", dataclasses.replace(small, kind="small_dense_equal_time"), share, steps)
        if r is not None:
            r["matched_to"] = rows


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Per method over seeds: mean (and each seed's) final loss and time, the ratios to dense at
    equal steps, and the loss of dense (and of factorized at init) at the method's own time: dense
    compressed (its frontier, the fair baseline) and also dense's own full run read at that time;
    for callback rows, the smaller dense model's curve read at their time (its longer runs on the
    table's time scale, ``time_scales``); the reruns' time ratios and losses."""
    axis = result["setup"]["time_axis"]
    per: dict[str, dict[str, Any]] = {}
    scales, reruns = time_scales(result), {}
    for seed, runs in result["runs"].items():
        for key, r in runs.items():
            if r["kind"] == "rerun" and r["rerun_of"] in runs:
                first = runs[r["rerun_of"]]
                reruns.setdefault(seed, {})[r["rerun_of"]] = {
                    "time": t_of(first, axis), "time_rerun": t_of(r, axis), "time_ratio": t_of(first, axis) / t_of(r, axis),
                    "final_val_loss": first["final_val_loss"], "final_val_loss_rerun": r["final_val_loss"]}  # fmt: skip
    for seed, runs in result["runs"].items():
        dense = runs.get("dense")
        if dense is None:
            continue
        frontier = [(t_of(r, axis), r["final_val_loss"]) for r in runs.values() if r["kind"] in ("dense", "dense_compressed")]
        dense_curve = [(p[axis], p["val_loss"]) for p in dense["curve"]]
        init_frontier = [(t_of(r, axis), r["final_val_loss"]) for r in runs.values() if r["kind"] in ("init", "init_equal_time")]
        small_frontier = [(t_scaled(r, axis, scales[seed]), r["final_val_loss"])
                          for r in runs.values() if r["kind"] in ("small_dense", "small_dense_equal_time")]  # fmt: skip
        for key, r in runs.items():
            if r["kind"] == "rerun":  # in "reruns" (its time is another session's)
                continue
            row = per.setdefault(key, {"kind": r["kind"], "seeds": {}})
            t = t_scaled(r, axis, scales[seed])
            s = {"final_val_loss": r["final_val_loss"], "time": t, "fit_seconds": r["fit_seconds"], "fit_cpu_seconds": r["fit_cpu_seconds"],
                 "steps": r["steps"], "speed_vs_dense": t_of(dense, axis) / t, "loss_vs_dense_equal_steps": r["final_val_loss"] / dense["final_val_loss"] - 1,
                 "macs_per_token": r["macs_per_token"]}  # fmt: skip
            at = interpolate(frontier, t) if t <= t_of(dense, axis) else None
            if at is None and t < min(frontier)[0]:  # faster than dense's shortest run: compare with
                at = min(frontier)[1]  # that run, which had more time (a conservative reading)
            if at is not None:
                s["dense_at_equal_time"] = at
                s["loss_vs_dense_equal_time"] = r["final_val_loss"] / at - 1
            along = interpolate(dense_curve, t)  # dense's own run, read mid-way (its LR not yet decayed)
            if along is not None:
                s["dense_curve_at_equal_time"] = along
                s["loss_vs_dense_curve_equal_time"] = r["final_val_loss"] / along - 1
            if len(init_frontier) == 2 and r["kind"] == "callback":
                first, last = min(init_frontier), max(init_frontier)
                at_init = interpolate(init_frontier, t) or (last[1] if t > last[0] else first[1])
                s["init_at_equal_time"] = at_init
                s["loss_vs_init_equal_time"] = r["final_val_loss"] / at_init - 1
            if small_frontier and r["kind"] == "callback":  # the smaller dense model's own curve at this run's time
                at_small = interpolate(small_frontier, t)
                s["small_dense_equal_time_outside_range"] = at_small is None
                if at_small is None:  # past its longest run (which had less time) or before its shortest (more)
                    at_small = max(small_frontier)[1] if t > max(small_frontier)[0] else min(small_frontier)[1]
                s["small_dense_at_equal_time"] = at_small
                s["loss_vs_small_dense_equal_time"] = r["final_val_loss"] / at_small - 1
            if r["kind"] == "small_dense_equal_time":
                s["time_scale"], s["time_unscaled"] = scales[seed], t_of(r, axis)
            row["seeds"][seed] = s
    for row in per.values():
        seeds = list(row["seeds"].values())
        for k in seeds[0]:
            vals = [s[k] for s in seeds if k in s]
            if len(vals) == len(seeds):
                row[f"mean_{k}"] = statistics.fmean(vals)
                if len(vals) > 1:
                    row[f"std_{k}"] = statistics.stdev(vals)
        row["n_seeds"] = len(seeds)
    full_seeds = max((row["n_seeds"] for row in per.values()), default=0)
    main = {k: row for k, row in per.items() if row["kind"] == "callback" and row["n_seeds"] == full_seeds}
    goals: dict[str, Any] = {}
    if main:
        # the best schedule for the time spent: lowest loss against dense at equal time (rows slower
        # than dense have no such value and rank after those by their final loss)
        best = min(main, key=lambda k: (main[k].get("mean_loss_vs_dense_equal_time", math.inf), main[k]["mean_final_val_loss"]))
        b = main[best]
        goals = {
            "best_callback": best,
            "chosen_by": "lowest mean loss relative to dense at equal time (dense's compressed runs)",
            "seeds": full_seeds,
            "per_schedule": {
                k: {"loss_vs_dense_at_equal_time": r.get("mean_loss_vs_dense_equal_time"),
                    "loss_vs_init_at_equal_time": r.get("mean_loss_vs_init_equal_time"),
                    "loss_vs_small_dense_at_equal_time": r.get("mean_loss_vs_small_dense_equal_time"),
                    "beats_small_dense_at_equal_time": r.get("mean_loss_vs_small_dense_equal_time", 1.0) < 0,
                    "beats_both": r.get("mean_loss_vs_dense_equal_time", 1.0) < 0 and r.get("mean_loss_vs_init_equal_time", 1.0) < 0}
                for k, r in main.items()
            },  # fmt: skip
            "beats_dense_at_equal_time": b.get("mean_loss_vs_dense_equal_time", 1.0) < 0,
            "loss_vs_dense_at_equal_time": b.get("mean_loss_vs_dense_equal_time"),
            "loss_vs_dense_own_curve_at_equal_time": b.get("mean_loss_vs_dense_curve_equal_time"),
            "beats_init_at_equal_time": b.get("mean_loss_vs_init_equal_time", 1.0) < 0,
            "loss_vs_init_at_equal_time": b.get("mean_loss_vs_init_equal_time"),
            "small_dense_at_equal_time": {  # issue 30 item 5: the same final multiply-adds (about) and the same time
                "beaten_by": sorted(k for k, r in main.items() if r.get("mean_loss_vs_small_dense_equal_time", 1.0) < 0),
                "beaten_on_every_seed_by": sorted(k for k, r in main.items() if r["seeds"] and all(
                    s.get("loss_vs_small_dense_equal_time", 1.0) < 0 for s in r["seeds"].values())),
                "best": min(main, key=lambda k: main[k].get("mean_loss_vs_small_dense_equal_time", math.inf)),
            },
        }
        ok = {k: r for k, r in main.items() if r["mean_loss_vs_dense_equal_steps"] <= GOAL_LOSS and r["mean_speed_vs_dense"] >= GOAL_SPEED}
        pick = min(ok or main, key=lambda k: main[k]["mean_final_val_loss"] if ok else
                   max(0, main[k]["mean_loss_vs_dense_equal_steps"] - GOAL_LOSS) / GOAL_LOSS + max(0, GOAL_SPEED - main[k]["mean_speed_vs_dense"]) / GOAL_SPEED)  # fmt: skip
        goals["equal_steps"] = {
            "goal": f"within {GOAL_LOSS:.0%} of dense at equal steps and >= {GOAL_SPEED}x faster",
            "met_by": sorted(ok), "closest" if not ok else "best": pick,
            "loss_vs_dense": main[pick]["mean_loss_vs_dense_equal_steps"], "speed_vs_dense": main[pick]["mean_speed_vs_dense"],
        }  # fmt: skip
    result["summary"] = {"methods": per, "goals": goals, "reruns": reruns, "time_scales": scales}
    return result["summary"]


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = result["setup"]["time_axis"]
    fig, ax = plt.subplots(figsize=(13.5, 6.0))
    names: dict[str, list[dict[str, Any]]] = {}
    scales = time_scales(result)
    for seed, runs in result["runs"].items():
        for key, r in runs.items():
            if r["kind"] == "rerun":
                continue
            scale = scales[seed] if r["kind"] == "small_dense_equal_time" else 1.0  # on the table's time scale
            names.setdefault(key, []).append({**r, "curve": [{**p, axis: p[axis] * scale} for p in r["curve"]]})
    frontier, small_frontier = [], []
    palette = itertools.cycle(["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "gold", "navy"])
    for key, rs in names.items():
        n = min(len(r["curve"]) for r in rs)
        xs = [statistics.fmean(r["curve"][i][axis] for r in rs) for i in range(n)]
        ys = [statistics.fmean(r["curve"][i]["val_loss"] for r in rs) for i in range(n)]
        if rs[0]["kind"] in ("dense", "dense_compressed"):
            frontier.append((xs[-1], ys[-1]))
            if rs[0]["kind"] == "dense_compressed":
                continue
        if rs[0]["kind"] in ("small_dense", "small_dense_equal_time"):
            small_frontier.append((xs[-1], ys[-1]))
            if rs[0]["kind"] == "small_dense_equal_time":
                ax.plot(xs, ys, "-", color="tab:gray", lw=0.8, alpha=0.45)
                continue
        style = {"dense": ("k", "o"), "init": ("tab:red", "s"), "init_equal_time": ("tab:red", "D"), "small_dense": ("tab:gray", "^")}
        if rs[0]["kind"] in style:
            color, marker = style[rs[0]["kind"]]
        else:
            color, marker = ("tab:cyan", "*") if key == "callback_auto" else (next(palette), "o")
        ls = ":" if key.startswith("exp_") else "-"
        ax.plot(xs, ys, ls, color=color, marker=marker, ms=3, lw=1.2, label=f"{key} ({xs[-1]:.0f} s, {ys[-1]:.3f}, {len(rs)} seeds)")
    if frontier:
        frontier.sort()
        ax.plot(*zip(*frontier), "--", color="k", lw=2, alpha=0.5, marker="x", ms=8, label="dense, LR schedule compressed (final points)")
    if len(small_frontier) > 1:
        small_frontier.sort()
        ax.plot(*zip(*small_frontier), "--", color="tab:gray", lw=2, alpha=0.8, marker="^", ms=7,
                label="small dense, LR schedule stretched to the callback runs' times (final points; thin: curves)")  # fmt: skip
    ax.set_xlabel("CPU seconds since the start of fit (1 thread)" if axis == "cpu_seconds" else "wall-clock seconds since the start of fit")
    ax.set_ylabel("validation loss (nats / byte)")
    s = result["setup"]
    m = s["model_kwargs"]
    ax.set_title(f"GPT LM on the whole stdlib, d={m['dim']} x {m['layers']} layers, {s['steps']} steps, "
                 f"mean of seeds", fontsize=10)  # fmt: skip
    ax.grid(alpha=0.3)
    finals = [y for _, y in frontier + small_frontier]
    if finals:
        ax.set_ylim(min(finals) - 0.05, max(y for _, y in frontier) + 0.35)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of the dense run (CPU 240, GPU 792)")
    parser.add_argument("--frontier", type=int, default=2, help="compressed dense runs per seed")
    parser.add_argument("--gpu", action="store_true", help="dim 1024, 8 layers, 16 heads, block 512, batch 32, bf16-mixed")
    parser.add_argument("--budget-s", type=float, default=None, help="skip runs that would end after this (GPU default 330)")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks the script in seconds")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--name", default=None, help="output stem (default lm_tradeoff[_gpu][_dry_run])")
    parser.add_argument("--compressed", type=int, nargs="+", default=None,
                        help="run only dense compressed to these step counts (a seed's frontier in another process)")
    parser.add_argument("--methods", nargs="+", default=None, help="run only these rows of the table (default: all)")
    parser.add_argument("--small-for", nargs="+", default=None,
                        help="callback rows whose time the smaller dense model's longer runs match (default: every "
                             "callback row but exp_*; 'none': no such runs)")
    parser.add_argument("--small-steps", type=int, nargs="+", default=None,
                        help="more step counts for the smaller model's longer runs (e.g. to reach past the slowest "
                             "row's time on every seed)")
    parser.add_argument("--rerun", nargs="+", default=None,
                        help="rows of the table to run again in this process (<row>_rerun): the session's time scale")
    parser.add_argument("--deadline", default=None, help="HH:MM (UTC): start no run after this time (skipped, with why)")
    parser.add_argument("--resume", nargs="+", default=None, help="result files whose runs count as done (not rerun)")
    parser.add_argument("--note", default=None, help="with --merge: how the runs were made, kept in setup.note")
    parser.add_argument("--merge", nargs="+", default=None, help="merge these result files' runs, summarize and plot")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or "lm_tradeoff" + ("_gpu" if args.gpu else "") + ("_dry_run" if args.dry_run else "")
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        result = parts[0]
        for part in parts[1:]:  # per seed, run by run (a seed's runs may come from several processes)
            for seed, runs in part["runs"].items():
                result["runs"].setdefault(seed, {}).update(runs)
            result["skipped"].update(part["skipped"])
            result["errors"].update(part["errors"])
        earlier = result["setup"].get("merged_from", [])  # a merged file merged again keeps its history
        result["setup"]["merged_from"] = earlier + [n for n in (Path(p).name for p in args.merge[1:]) if n not in earlier]
        if not earlier:
            result["setup"]["merged_from"].insert(0, Path(args.merge[0]).name)
        result["setup"]["seeds"] = sorted(int(seed) for seed in result["runs"])
        if args.note and args.note not in result["setup"].get("note", ""):
            result["setup"]["note"] = " ".join(filter(None, [result["setup"].get("note"), args.note]))
        return finish(result, json_path, png_path)
    if args.gpu and not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench_lm_tradeoff.py --gpu needs a CUDA GPU; none is visible here (--dry-run checks the script on the CPU)")
    torch.set_num_threads(1)  # a shared CPU: more threads only contend (and CPU time stays one core's)
    cfg = config(args.gpu, args.dry_run, args.steps)
    cfg["frontier"], cfg["only"] = args.frontier, args.methods
    cfg["small_for"] = [] if args.small_for == ["none"] else args.small_for
    cfg["rerun"], cfg["deadline"], cfg["small_steps"] = args.rerun, args.deadline, args.small_steps
    unknown = (set(args.methods or ()) | set(cfg["small_for"] or ()) | set(args.rerun or ())) - {m.name for m in methods(cfg)}
    if unknown:
        raise SystemExit(f"--methods / --small-for: no such rows {sorted(unknown)}; the table has {[m.name for m in methods(cfg)]}")
    budget_s = args.budget_s if args.budget_s is not None else cfg["budget_s"]
    result: dict[str, Any] = {
        "benchmark": "lm_tradeoff",
        "setup": {
            "model": "examples/gpt_task.GPT, byte-level, tied head", "model_kwargs": cfg["model"], "steps": cfg["steps"],
            "epochs": cfg["epochs"], "trainer": cfg["trainer"] or "CPU, 32-true", "threads": torch.get_num_threads(),
            "corpus": "every .py file of the standard library, subpackages and the test package included, site-packages left out; "
                      "split by file (CRC-32 of the relative path, 10 % validation): examples/gpt_task.stdlib_tree",
            "time_axis": cfg["time_axis"], "budget_s": budget_s, "seeds": args.seeds, "dry_run": args.dry_run,
            "methods": [dataclasses.asdict(m) | {"schedule": str(m.schedule)} for m in methods(cfg)],
            "torch": torch.__version__, "lightning": pl.__version__, "machine": platform.processor() or platform.machine(),
            "device": torch.cuda.get_device_name() if args.gpu and not args.dry_run else "cpu",
        },
        "runs": {}, "skipped": {}, "errors": {}, "version": package_version(),
    }  # fmt: skip

    for path in args.resume or []:
        for seed, runs in json.loads(Path(path).read_text())["runs"].items():
            result["runs"].setdefault(seed, {}).update(runs)

    def save() -> None:
        json_path.write_text(json.dumps(result, indent=1, default=str))

    if cfg["model"].get("corpus") == "full" and not args.dry_run:
        stdlib_tree()  # read (and cached) before any timed fit: no run's time holds the corpus's reading
    # (the dry run's tiny fits take a fraction of a second: there the first, dense, holds the reading,
    # and the compressed-dense path is exercised because dense is the slowest of the plain fits)
    budget = Budget(budget_s, cfg["dense_seconds_planned"] * cfg["steps"] / (792 if args.gpu else 240))
    t0 = time.perf_counter()
    for seed in args.seeds:
        if args.compressed:
            for steps in args.compressed:
                runs = result["runs"].setdefault(str(seed), {})
                runs[f"dense_{steps}"] = fit(Method("dense", None, kind="dense_compressed"), cfg, seed, steps)
                save()
        else:
            run_seed(seed, seed == 0, cfg, result, budget, save)
    result["benchmark_seconds"] = time.perf_counter() - t0
    finish(result, json_path, png_path)
    if result["errors"]:
        raise SystemExit(f"runs failed: {sorted(result['errors'])}")
    return result


def finish(result: dict[str, Any], json_path: Path, png_path: Path) -> dict[str, Any]:
    summary = summarize(result)
    json_path.write_text(json.dumps(result, indent=1, default=str))
    plot(result, png_path)
    print(json.dumps(summary["goals"], indent=1))
    for key, row in summary["methods"].items():
        print(f"{key:>40}: loss {row['mean_final_val_loss']:.4f}, time {row['mean_time']:7.1f} s, {row['mean_speed_vs_dense']:.2f}x, "
              f"vs dense at equal time {row.get('mean_loss_vs_dense_equal_time', float('nan')):+.2%} ({row['n_seeds']} seeds)")  # fmt: skip
    print(f"wrote {json_path} and {png_path}")
    return result


if __name__ == "__main__":
    main()
