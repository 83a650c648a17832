"""``schedule="auto"`` (issue 22): the stable-rank readiness signal, the switch epoch it chooses,
its checkpointed state (a resume mid-watching switches at the same epoch), settings and YAML."""

from __future__ import annotations

import math

import pytest
import torch

from factorize_plugin import Auto, FixedRank, LowRankFactorization, MaxNMSE, ParamBudget, Readiness
from factorize_plugin.core.stable_rank import spectral_norm_sq, stable_rank
from factorize_plugin.engine.state import migrate_state
from factorize_plugin.layers.adapters import LayerView
from factorize_plugin.surgery.ranks.readiness import largest_change, layer_states
from lightning_helpers import TARGETS, TINY, SettlingNet, resume_trainer, structure

SETTLE = 2  # the synthetic spectra stop changing after epoch SETTLE: ready at SETTLE + 1, switch at SETTLE + 2
SWITCH = SETTLE + 2
MAX_EPOCHS = 6  # Readiness.latest=0.75 -> epoch 5 at the latest: later than SWITCH


def _callback(readiness: Readiness | None = None) -> LowRankFactorization:
    return LowRankFactorization(Auto(target=FixedRank(0.5), readiness=readiness), **TINY)


def _watch(cb: LowRankFactorization) -> list[dict]:
    return [h for h in cb.history if h.get("event") == "watch"]


def _milestones(cb: LowRankFactorization) -> list[dict]:
    return [h for h in cb.history if h.get("event") == "milestone"]


# ------------------------------------------------------------------ the signal
def test_stable_rank_matches_the_svd_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    for shape in [(40, 25), (25, 40), (200, 64)]:
        u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=g))
        v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=g))
        s = torch.linspace(1.0, 0.1, min(shape))
        s[0] = 1.25  # sigma_2 / sigma_1 = 0.8: the error shrinks as 0.8^(4 * iterations)
        w = (u * s) @ v.T
        exact = float(w.square().sum() / torch.linalg.matrix_norm(w, 2) ** 2)
        assert stable_rank(w) == pytest.approx(exact, rel=1e-6)
        s[0] = 1.02  # a small gap: still close, from above
        w = (u * s) @ v.T
        exact = float(w.square().sum() / torch.linalg.matrix_norm(w, 2) ** 2)
        assert stable_rank(w) == pytest.approx(exact, rel=0.02)
        assert stable_rank(w) == stable_rank(w.clone())  # a function of W alone: same on every process
        assert stable_rank(w) >= exact * (1 - 1e-6)  # power iteration never overestimates ||W||_2
    assert stable_rank(torch.eye(30)) == pytest.approx(30.0)
    assert stable_rank(torch.outer(torch.arange(1.0, 6), torch.ones(7))) == pytest.approx(1.0)
    assert stable_rank(torch.zeros(5, 4)) == 0.0
    with pytest.raises(ValueError, match="matrix"):
        spectral_norm_sq(torch.zeros(2, 3, 4))


def test_largest_change_is_the_largest_relative_move():
    assert largest_change({"a": 2.0, "b": 4.0}, None) is None
    assert largest_change({"a": 2.2, "b": 4.0}, {"a": 2.0, "b": 5.0}) == pytest.approx(0.2)
    assert largest_change({"a": 1.0}, {"a": 0.0}) == math.inf


def test_a_layer_within_room_of_its_planned_rank_counts_as_settled():
    r = Readiness(tolerance=0.1, room=0.25)
    kept = {"a": 40, "b": 40, "c": None}
    # a: far below its rank, moving a lot; b: above the room, settled; c: no planned rank, moving
    assert layer_states({"a": 10.0, "b": 20.0, "c": 5.0}, {"a": 5.0, "b": 19.0, "c": 4.0}, kept, r) == {
        "a": "within_room", "b": "settled", "c": "moving"}  # fmt: skip
    assert layer_states({"a": 10.0, "b": 20.0}, None, kept, r) == {"a": "within_room", "b": "moving"}
    assert layer_states({"a": 10.0}, None, kept, Readiness(room=None)) == {"a": "moving"}


def test_planned_ranks_come_from_the_shape_where_the_target_tells():
    view = LayerView(in_dim=256, out_dim=1024, rank_base=256, rank=None, geometry=None)
    assert FixedRank(0.25).planned_rank(view) == 64
    assert FixedRank(12).planned_rank(view) == 12
    assert ParamBudget(0.5).planned_rank(view) == round(0.5 * 256 * 1024 / 1280)  # r (D + M) = f D M
    assert ParamBudget(0.5, metric="macs").planned_rank(view) == 102
    assert MaxNMSE(0.1).planned_rank(view) is None  # needs the statistics


class WobblingNet(SettlingNet):
    """Spectra that never settle: the largest singular value 3x its final value every other epoch."""

    def spectrum_weight(self, name: str, epoch: int) -> torch.Tensor:
        return super().spectrum_weight(name, self.settle_epoch - 2 * (epoch % 2))


@pytest.mark.parametrize("room", [1.0, None])
def test_spectra_inside_the_planned_ranks_switch_at_the_first_validation_run(room):
    # stable ranks 6.1 / 12.0 / 3.9 (then 1.6 / 2.2 / 1.3) against planned ranks 7 / 28 / 9: within
    # room=1 from the first validation run, though they never stop moving
    cb = LowRankFactorization(Auto(target=FixedRank(0.9), readiness=Readiness(room=room, latest=0.5)), **TINY)
    resume_trainer([cb], 4).fit(WobblingNet())
    watch = _watch(cb)
    if room is None:
        assert [w["reason"] for w in watch] == [None, "latest"] and watch[-1]["moving"] == sorted(TARGETS)
    else:
        assert [w["reason"] for w in watch] == ["settled"] and watch[0]["switch_epoch"] == 1
        assert watch[0]["within_room"] == sorted(TARGETS) and watch[0]["moving"] == []
        assert [m["epoch"] for m in _milestones(cb)] == [1]


# ------------------------------------------------------------------ when it switches
def test_switches_when_the_spectra_settle_not_before():
    cb = _callback()
    model = SettlingNet(settle_epoch=SETTLE)
    resume_trainer([cb], MAX_EPOCHS).fit(model)
    watch = _watch(cb)
    # one observation per validation run until the switch is decided, none after
    assert [w["epoch"] for w in watch] == list(range(SWITCH))
    assert [w["ready"] for w in watch] == [False] * (SWITCH - 1) + [True]
    assert watch[-1]["reason"] == "settled" and watch[-1]["switch_epoch"] == SWITCH
    assert watch[0]["stable_rank_change"] is None
    for w in watch[1:SETTLE + 1]:  # the spectra still moving: far above the tolerance
        assert w["stable_rank_change"] > 0.2
    assert watch[SETTLE + 1]["stable_rank_change"] == 0.0  # the same weights: the same estimate, exactly
    for w in watch:
        assert set(w["stable_rank"]) == set(TARGETS)
        assert w["signal_seconds"] > 0 and w["validation_seconds"] > 0
        assert w["watch_cost"] == pytest.approx(w["signal_seconds"] / w["validation_seconds"])
    (m,) = _milestones(cb)
    assert m["epoch"] == SWITCH and m["milestone"] == SWITCH
    assert m["statistics"] == "validation"  # collected in the validation run that decided
    assert m["value"]["class_path"] == "factorize_plugin.FixedRank"
    assert cb.done == [SWITCH]
    assert structure(model) == {"features.2": 4, "classifier.0": 16, "classifier.2": 5}


def test_latest_epoch_switches_a_model_that_never_settles():
    cb = _callback(readiness=Readiness(latest=0.5))
    model = WobblingNet()
    resume_trainer([cb], 4).fit(model)
    watch = _watch(cb)
    assert [w["ready"] for w in watch] == [False, True]
    assert watch[-1]["reason"] == "latest" and watch[-1]["switch_epoch"] == 2
    assert [m["epoch"] for m in _milestones(cb)] == [2]


def test_readiness_is_logged():
    cb = _callback(readiness=Readiness(latest=None))
    trainer = resume_trainer([cb], SETTLE + 1)
    trainer.fit(SettlingNet(settle_epoch=SETTLE))
    metrics = trainer.callback_metrics
    assert float(metrics["factorize/ready"]) == 0.0
    assert float(metrics["factorize/stable_rank_change"]) == pytest.approx(_watch(cb)[-1]["stable_rank_change"])
    assert float(metrics["factorize/watch_cost"]) > 0
    assert float(metrics["factorize/classifier.0/stable_rank"]) == pytest.approx(
        _watch(cb)[-1]["stable_rank"]["classifier.0"]
    )


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize("resume_after", [SETTLE - 1, SWITCH - 1])  # mid-watching; decided, not yet switched
def test_resume_mid_watching_switches_at_the_same_epoch(tmp_path, resume_after):
    full = _callback()
    full_model = SettlingNet(settle_epoch=SETTLE)
    resume_trainer([full], MAX_EPOCHS, ckpt_dir=tmp_path).fit(full_model)

    ckpt = torch.load(tmp_path / f"epoch={resume_after}.ckpt", weights_only=True)  # plain data: safe loading
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("LowRankFactorization")]
    assert state["version"] == LowRankFactorization.STATE_VERSION == 3
    assert state["auto"]["previous"] == _watch(full)[resume_after]["stable_rank"]

    resumed = _callback()
    model = SettlingNet(settle_epoch=SETTLE)
    resume_trainer([resumed], MAX_EPOCHS).fit(model, ckpt_path=str(tmp_path / f"epoch={resume_after}.ckpt"))
    assert [m["epoch"] for m in _milestones(resumed)] == [m["epoch"] for m in _milestones(full)] == [SWITCH]
    keys = ("epoch", "ready", "reason", "switch_epoch", "stable_rank", "stable_rank_change", "settled_runs")
    assert [{k: w[k] for k in keys} for w in _watch(resumed)] == [{k: w[k] for k in keys} for w in _watch(full)]
    assert structure(model) == structure(full_model)


def test_a_version_1_state_migrates_and_watching_starts_over():
    old = {"version": 1, "done": [], "ranks": {}, "history": [], "param_groups": None, "targets": list(TARGETS)}
    assert migrate_state(old)["auto"] is None
    cb = _callback()
    cb._auto.calm, cb._auto.previous = 3, {"x": 1.0}
    cb.load_state_dict(old)
    assert cb._auto.calm == 0 and cb._auto.previous is None and cb._auto.switch_epoch is None
    assert cb.schedule == {}


# ------------------------------------------------------------------ settings
def test_auto_settings_and_their_errors():
    cb = LowRankFactorization("auto")
    assert cb.schedule == {} and cb._auto.target == ParamBudget(0.5, metric="macs", sensitivity=False)
    assert LowRankFactorization("auto")._auto.target is not cb._auto.target
    assert LowRankFactorization(Auto(target=0.3), mode="param_budget")._auto.target == ParamBudget(0.3)
    assert LowRankFactorization(Auto(target=8))._auto.target == FixedRank(8)
    with pytest.raises(ValueError, match="'sometimes'.*'auto'"):
        LowRankFactorization("sometimes")
    with pytest.raises(ValueError, match="target and readiness only apply to schedule='auto'"):
        LowRankFactorization({1: 0.5}, target=0.25, readiness=Readiness())
    with pytest.raises(TypeError, match="readiness must be a factorize_plugin.Readiness"):
        LowRankFactorization(Auto(readiness={"tolerance": 0.1}))
    with pytest.raises(ValueError, match="param_budget must be"):
        LowRankFactorization(Auto(target=1.5), mode="param_budget")
    with pytest.raises(ValueError, match="Readiness.tolerance must be a number in \\(0, 1\\)"):
        Readiness(tolerance=0.0)
    with pytest.raises(ValueError, match="Readiness.patience"):
        Readiness(patience=0)
    with pytest.raises(ValueError, match="Readiness.latest must be None or a number in \\(0, 1\\]"):
        Readiness(latest=1.5)
    with pytest.raises(ValueError, match="Readiness.iterations"):
        Readiness(iterations=0)
    for bad in (0.0, 1.5, True, "x"):
        with pytest.raises(ValueError, match="Readiness.room"):
            Readiness(room=bad)
    assert Readiness(latest=0.75).latest_epoch(8) == 6
    assert Readiness(latest=1.0).latest_epoch(8) == 7  # the last epoch that runs
    assert Readiness(latest=None).latest_epoch(8) is None
    assert Readiness().latest_epoch(None) is None


# ------------------------------------------------------------------ DDP
@pytest.mark.slow
def test_ddp_two_processes_decide_the_same(tmp_path):
    """strategy="ddp", 2 gloo processes: the same switch epoch as one process, decided from the
    all-reduced signal, also when the ranks' own measurements disagree."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(here / "ddp_auto_script.py"), str(tmp_path)], env=env, capture_output=True, text=True,
        timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    keys = ("epoch", "stable_rank", "stable_rank_change", "ready", "reason", "switch_epoch")
    for run in ("plain", "disturbed"):
        w0, w1 = ([{k: w[k] for k in keys} for w in _watch_of(r[run]["history"])] for r in (r0, r1))
        assert w0 == w1, run  # the same agreed numbers and decisions on both ranks
        assert r0[run]["structure"] == r1[run]["structure"]
    # undisturbed: identical weights on both ranks, the single-process switch epoch
    assert r0["plain"]["local"] == r1["plain"]["local"]
    assert [m["epoch"] for m in _milestones_of(r0["plain"]["history"])] == [SWITCH]
    # disturbed: rank 0 alone would be ready at SETTLE + 1, rank 1 alone never; the agreed mean of the
    # two keeps moving, so both switch together at the latest epoch (0.75 * 6 -> 5)
    w0 = _watch_of(r0["disturbed"]["history"])
    for w, a, b in zip(w0, r0["disturbed"]["local"], r1["disturbed"]["local"]):
        assert w["stable_rank"] == pytest.approx({n: (a[n] + b[n]) / 2 for n in a}, rel=1e-12)
    assert w0[-1]["reason"] == "latest" and w0[-1]["switch_epoch"] == 5
    assert [m["epoch"] for m in _milestones_of(r1["disturbed"]["history"])] == [5]


def _watch_of(history: list) -> list:
    return [h for h in history if h.get("event") == "watch"]


def _milestones_of(history: list) -> list:
    return [h for h in history if h.get("event") == "milestone"]
