"""Checkpoints and resume, single process (issue 5): resuming a fresh dense model mid-schedule
gives the uninterrupted run's weights; the optimizer state lands on the right parameters; loaders;
separate state of two instances; a crash between solve and swap leaves a resumable checkpoint."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import factorize_plugin.engine.engine as engine_module
import factorize_plugin.engine.state as callback_state_module
import factorize_plugin.surgery.swap.refactorize as refactorize_module
from factorize_plugin import LowRankFactorization, load_factorized, load_factorized_checkpoint
from factorize_plugin.layers import decode_extra_state
from lightning_helpers import (
    TARGETS,
    TINY,
    Probe,
    TinyNet,
    max_abs_diff,
    no_hooks_left,
    optimizer_ids,
    resume_trainer,
    state_dict_cpu,
    structure,
    tiny,
    trainable_ids,
)

SCHEDULE = {2: 0.5, 4: 0.25}
MAX_EPOCHS = 5
R1 = {"features.2": 4, "classifier.0": 16, "classifier.2": 5}
R2 = {"features.2": 2, "classifier.0": 8, "classifier.2": 2}
WANT = {0: dict.fromkeys(TARGETS), 1: dict.fromkeys(TARGETS), 2: R1, 3: R1, 4: R2}




def new_model() -> TinyNet:
    # Adam + StepLR, shuffled with a per-epoch seed (identical in a resumed run), sorted param groups
    return TinyNet(shuffle="epoch_seeded", optimizer="adam", scheduler="step")


def run(ckpt_dir=None, ckpt_path=None, extra=()) -> dict:
    pl.seed_everything(0)
    model = new_model()
    cb = LowRankFactorization(SCHEDULE, **TINY)
    probe = Probe()
    callbacks = [cb, probe, *extra]
    trainer = resume_trainer(callbacks, MAX_EPOCHS, ckpt_dir)
    out = dict(model=model, cb=cb, probe=probe, trainer=trainer)
    try:
        trainer.fit(model, ckpt_path=ckpt_path)
    except Exception as err:  # noqa: BLE001 - the crash test inspects it
        out["error"] = err
        return out
    out["final"] = state_dict_cpu(model)
    out["optimizer"] = optimizer_by_name(trainer, model)
    out["lr"] = [g["lr"] for g in trainer.optimizers[0].param_groups]
    return out


def optimizer_by_name(trainer, model) -> dict:
    """Param group index, step and Adam moments of every parameter, by name."""
    opt = trainer.optimizers[0]
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g, group in enumerate(opt.param_groups):
        for p in group["params"]:
            st = opt.state.get(p, {})
            out[names[id(p)]] = (g, float(st["step"]) if st else None, st.get("exp_avg"), st.get("exp_avg_sq"))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, checkpointing after every epoch."""
    ckpt_dir = tmp_path_factory.mktemp("reference")
    ref = run(ckpt_dir=ckpt_dir)
    assert "error" not in ref
    assert ref["probe"].start == WANT and ref["cb"].done == [2, 4]
    ref["ckpt"] = {e: ckpt_dir / f"epoch={e}.ckpt" for e in range(MAX_EPOCHS)}
    return ref


# Checkpoints written at the end of epoch k (after its validation run):
#   0: before the first milestone; 1: at it (its statistics were just collected, not applied);
#   2: after it (factorized structure, Adam state of new parameters); 3: at the second
#   milestone (re-factorization of a factorized model pending, statistics to be re-collected).
@pytest.mark.parametrize("epoch", [0, 1, 2, 3], ids=["before", "at", "after", "at-second"])
def test_resume_matches_uninterrupted_run(reference, epoch):
    res = run(ckpt_path=reference["ckpt"][epoch])
    assert "error" not in res, res.get("error")
    # the same weights as the uninterrupted run (bit-identical on CPU with deterministic settings)
    assert max_abs_diff(res["final"], reference["final"]) <= 1e-6
    # no milestone repeated or skipped: the structure at every resumed epoch is the reference's
    assert res["probe"].start == {e: WANT[e] for e in range(epoch + 1, MAX_EPOCHS)}
    assert res["cb"].done == [2, 4]
    assert [h["epoch"] for h in res["cb"].history] == [2, 4]
    # resumed right after the statistics' validation run, the callback re-collects them itself,
    # and that gives bit-identical factors (the weights above)
    sources = {h["epoch"]: h["statistics"] for h in res["cb"].history}
    if epoch + 1 in SCHEDULE:
        assert sources[epoch + 1] == "calibration"
    # optimizer and scheduler states on the right parameters, in the right groups
    ref_opt, opt = reference["optimizer"], res["optimizer"]
    assert opt.keys() == ref_opt.keys()
    for name, (group, step, m1, m2) in opt.items():
        r_group, r_step, r_m1, r_m2 = ref_opt[name]
        assert (group, step) == (r_group, r_step), name
        assert (m1 is None) == (r_m1 is None) and (m1 is None or torch.equal(m1, r_m1)), name
        assert m2 is None or torch.equal(m2, r_m2), name
    assert res["lr"] == reference["lr"]
    assert all(res["probe"].opt_consistent)


def test_resume_needs_the_param_group_reordering(reference, monkeypatch):
    """Control: without the callback's re-ordering, configure_optimizers' name-sorted order differs
    from the saved one once layers are factorized, and the optimizer state lands on the wrong
    tensors (torch only checks the count per group): resume fails or diverges."""
    monkeypatch.setattr(callback_state_module, "restore_param_group_order", lambda *a, **k: None)
    res = run(ckpt_path=reference["ckpt"][2])
    if "error" in res:  # Adam's moments of a [32] bias meet a [16, 256] factor
        assert "size of tensor" in str(res["error"])
    else:
        assert max_abs_diff(res["final"], reference["final"]) > 1e-3


def test_loading_a_factorized_checkpoint(reference):
    path = reference["ckpt"][4]  # the last one: the final model
    model = load_factorized_checkpoint(TinyNet, str(path))
    assert structure(model) == R2
    assert max_abs_diff(state_dict_cpu(model), reference["final"]) == 0.0
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(model.eval()(x), reference["model"].eval()(x))
    # a plain nn.Module / LightningModule built dense, loaded from the bare state dict
    plain = load_factorized(new_model(), torch.load(path, weights_only=True)["state_dict"])
    assert structure(plain) == R2
    # Lightning's own loader on a module that never heard of the plugin: an error, not a wrong model
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict.*first\.weight"):
        TinyNet.load_from_checkpoint(path)


def test_checkpoint_holds_structure_and_callback_state(reference):
    ckpt = torch.load(reference["ckpt"][2], weights_only=True)  # plain types only: safe loading works
    sd = ckpt["state_dict"]
    assert decode_extra_state(sd["classifier.0._extra_state"]) == {"factorize_plugin": "linear", "rank": 16}
    assert "classifier.0.weight" not in sd and sd["classifier.0.first.weight"].shape == (16, 256)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("LowRankFactorization")]
    assert state["done"] == [2] and state["ranks"] == R1
    names = [n for group in state["param_groups"][0] for n in group]
    assert sorted(names) == sorted(n for n, _ in reference["model"].named_parameters())


def test_two_instances_keep_separate_state(tmp_path):
    """Two callbacks on different layers and epochs: distinct state keys, each restores its own state."""

    def build():
        return [
            LowRankFactorization({1: 0.5}, **tiny(["classifier.*"])),
            LowRankFactorization({2: 0.5}, **tiny(["features.2"])),
        ]

    def trainer(cbs, **kw):
        return pl.Trainer(
            accelerator="cpu", devices=1, max_epochs=3, callbacks=cbs, logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path, **kw,
        )  # fmt: skip

    pl.seed_everything(0)
    a, b = build()
    model = new_model()
    ck = ModelCheckpoint(dirpath=tmp_path, filename="last", save_top_k=1)
    trainer([a, b, ck]).fit(model)
    assert a.state_key != b.state_key
    assert (a.done, b.done) == ([1], [2])
    assert structure(model) == {"features.2": 4, "classifier.0": 16, "classifier.2": 5}
    states = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]
    assert states[a.state_key]["done"] == [1] and set(states[a.state_key]["ranks"]) == {"classifier.0", "classifier.2"}
    assert states[b.state_key]["done"] == [2] and set(states[b.state_key]["ranks"]) == {"features.2"}

    a2, b2 = build()
    fresh = new_model()
    trainer([a2, b2], enable_checkpointing=False).fit(fresh, ckpt_path=tmp_path / "last.ckpt")  # max_epochs reached: restore only
    assert (a2.done, b2.done) == ([1], [2])
    assert (a2.ranks, b2.ranks) == (a.ranks, b.ranks)
    assert max_abs_diff(state_dict_cpu(fresh), state_dict_cpu(model)) == 0.0


def test_crash_between_solve_and_swap(reference, tmp_path, monkeypatch):
    """The swap of the second milestone dies after installing one layer: the model is put back as
    it was (no half-swapped model, optimizer consistent, no hooks left); the last checkpoint on disk
    loads and resumes to the uninterrupted run's weights."""
    real_refactorize, real_install = engine_module.refactorize, refactorize_module.install_factors
    milestones, installs = [], []

    def counting(*args, **kwargs):
        milestones.append(1)
        return real_refactorize(*args, **kwargs)

    def crashing(module, *factors):
        if len(milestones) == 2:
            installs.append(1)
            if len(installs) == 2:  # one layer swapped, then the process "dies"
                raise RuntimeError("injected crash between solve and swap")
        return real_install(module, *factors)

    monkeypatch.setattr(engine_module, "refactorize", counting)
    monkeypatch.setattr(refactorize_module, "install_factors", crashing)
    crashed = run(ckpt_dir=tmp_path)
    assert "injected crash" in str(crashed.get("error"))
    model, trainer = crashed["model"], crashed["trainer"]
    assert structure(model) == R1  # as after the first milestone, not half of the second
    assert optimizer_ids(trainer.optimizers[0]) == trainable_ids(model)
    assert no_hooks_left(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"epoch={e}.ckpt" for e in range(4)]

    last = tmp_path / "epoch=3.ckpt"
    assert structure(load_factorized_checkpoint(TinyNet, str(last))) == R1
    monkeypatch.setattr(refactorize_module, "install_factors", real_install)
    resumed = run(ckpt_path=last)
    assert "error" not in resumed
    assert max_abs_diff(resumed["final"], reference["final"]) <= 1e-6
    assert resumed["cb"].done == [2, 4]


def test_missed_milestone_is_applied_late_once_with_a_warning(tmp_path):
    """A run resumed past a milestone it never applied (here: trained without the callback) gets
    it at the next epoch start, with a warning, instead of silently skipping it."""
    pl.seed_everything(0)
    model = new_model()
    ck = ModelCheckpoint(dirpath=tmp_path, filename="plain", save_top_k=1)
    pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=2, callbacks=[ck], logger=False, enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(model)  # fmt: skip
    cb = LowRankFactorization({1: 0.5}, **TINY)
    probe = Probe()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=4, callbacks=[cb, probe], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with pytest.warns(UserWarning, match=r"milestone\(s\) \[1\] were not applied when due"):
        trainer.fit(new_model(), ckpt_path=tmp_path / "plain.ckpt")
    assert probe.start == {2: R1, 3: R1}
    assert cb.done == [1] and [h["epoch"] for h in cb.history] == [2]
