"""LowRankFactorization in a real Trainer (CPU, small): schedule, optimizer, scheduler, logging,
precision, accumulation, validation placement, modes and every refusal (issue 4)."""

from __future__ import annotations

import csv
import math
import types

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import StochasticWeightAveraging
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision

import factorize_plugin.engine.milestone as milestone_module
import factorize_plugin.surgery.pipeline as pipeline_module
import factorize_plugin.surgery.statistics.passes as passes_module
import factorize_plugin.surgery.swap.refactorize as refactorize_module
from factorize_plugin import LowRankFactorization, Statistics, Targets
from lightning_helpers import (
    TARGETS,
    TINY,
    Probe,
    TinyNet,
    composed,
    cosine_lr,
    no_hooks_left,
    optimizer_ids,
    state_dict_cpu,
    structure,
    trainable_ids,
)  # fmt: skip


def make_trainer(callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True,
    )  # fmt: skip
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


# --------------------------------------------------------------------------- the real task
@pytest.mark.slow
def test_two_milestones_on_real_digits(tmp_path):
    """sklearn digits, MNISTClassifier, Adam + cosine LR, milestones at epochs 2 and 4."""
    from examples.tasks.mnist import MNISTClassifier, MNISTDataModule

    pl.seed_everything(0)
    dm = MNISTDataModule(source="sklearn-digits", batch_size=32)
    model = MNISTClassifier(image_size=8, channels=(16, 32), hidden=64, lr=3e-3, max_epochs_hint=6)
    names = ("features.2", "classifier.0", "classifier.2")  # min_params=1024 (default), min_features=16
    untouched = ("features.0.weight", "classifier.4.weight")  # too small to be targeted
    cb = LowRankFactorization({2: 0.5, 4: 0.25}, targets=Targets(min_features=16), verbose=False, speed_guard=False)  # keep the 16->32 conv
    probe = Probe(names)
    accs: dict[int, float] = {}

    class ValAcc(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                accs[trainer.current_epoch] = float(trainer.callback_metrics["val_acc"])

    trainer = make_trainer([cb, probe, ValAcc()], max_epochs=6, logger=CSVLogger(tmp_path, name="csv"))
    trainer.fit(model, dm)

    # --- structure and ranks change exactly at the scheduled epochs. Fractions are of min(in, out)
    # channels / features: features.2 is a 16->32 conv (rank 8, then 4), classifier.0 512->64
    # (32, then 16), classifier.2 64->64: rank 32 would not save multiply-adds (the largest that
    # does is 64*64 // 128 - 1 = 31), so it stays dense at 0.5 and gets rank 16 at 0.25.
    r1 = {"features.2": 8, "classifier.0": 32, "classifier.2": None}
    r2 = {"features.2": 4, "classifier.0": 16, "classifier.2": 16}
    dense = dict.fromkeys(names)
    want = {0: dense, 1: dense, 2: r1, 3: r1, 4: r2, 5: r2}
    assert probe.start == want
    assert probe.end == want  # nothing changes inside an epoch
    assert cb.done == [2, 4] and [h["epoch"] for h in cb.history] == [2, 4]
    assert [h["statistics"] for h in cb.history] == ["validation", "validation"]  # no extra pass
    assert structure(model, names) == r2

    # --- statistics only in the validation run before a milestone; never in the sanity check (where
    # one hook per target only counts calls, to find layers that never run before training)
    for epoch, sanity, hooks in probe.val_hooks:
        assert hooks == (len(names) if sanity or epoch + 1 in (2, 4) else 0), (epoch, sanity, hooks)
    assert any(s for _, s, _ in probe.val_hooks)  # the sanity check did run
    assert no_hooks_left(model)

    # --- the optimizer holds exactly the model's trainable parameters; same optimizer/scheduler objects
    assert probe.opt_consistent and all(probe.opt_consistent)
    assert len(set(probe.opt_ids)) == 1 and len(set(probe.sched_ids)) == 1
    opt = trainer.optimizers[0]
    assert optimizer_ids(opt) == trainable_ids(model)
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is opt

    # --- the LR schedule continues across the swaps (cosine over 6 epochs, never restarted)
    for epoch in range(6):
        assert probe.lr[epoch][0] == pytest.approx(cosine_lr(3e-3, 6, epoch), rel=1e-12), epoch

    # --- untouched parameters keep their Adam state across a swap; every new pair's state is carried
    # from what it replaces (surgery/swap/carry.py): its step count is the dense weight's, and goes on
    steps_per_epoch = math.ceil(len(dm.train_set) / 32)
    for epoch in (2, 4):
        for n in untouched:
            before, after = probe.adam_end[epoch - 1][n], probe.adam_start[epoch][n]
            assert after[0] == before[0] == epoch * steps_per_epoch
            assert torch.equal(after[1], before[1])
        params = dict(model.named_parameters())
        for name in (n for n in names if want[epoch][n] != want[epoch - 1][n]):
            new = [p for p in probe.adam_start[epoch] if p.startswith(name + ".")]
            assert new and all(probe.adam_start[epoch][p][0] == epoch * steps_per_epoch for p in new), name
            if epoch == 4:
                assert all(probe.adam_start[epoch][p][1].shape == params[p].shape for p in new)
        assert all(st is not None for st in probe.adam_start[epoch].values())  # no parameter left without state

    # --- training goes on well
    assert all(math.isfinite(x) for x in probe.losses)
    assert accs[5] >= 0.9, accs
    assert accs[5] >= accs[3] - 0.02, accs  # no lasting damage from the second (re-)factorization

    # --- metrics reach callback_metrics and the CSV logger's file, at the milestone epochs only
    assert float(trainer.callback_metrics["factorize/params_kept"]) < 0.35
    assert float(trainer.callback_metrics["factorize/classifier.0/rank"]) == 16
    with open(trainer.logger.experiment.metrics_file_path) as f:
        rows = list(csv.DictReader(f))
    keys = [k for k in rows[0] if k.startswith("factorize/")]
    for k in ("factorize/mean_nmse", "factorize/params_kept", "factorize/macs_kept", "factorize/features.2/nmse",
              "factorize/features.2/rank", "factorize/classifier.2/rank"):  # fmt: skip
        assert k in keys
    logged = {(int(r["epoch"]), float(r["factorize/features.2/rank"])) for r in rows if r.get("factorize/features.2/rank")}
    assert logged == {(2, 8.0), (4, 4.0)}


# --------------------------------------------------------------------------- precision, key 0
def test_calibration_at_key_0_and_precisions():
    """Key 0 factorizes before the first training step from one calibration pass over the
    validation data; under bf16-mixed and fp16-mixed the statistics stay float64 and are not
    computed under autocast: the first conv (whose input is the float32 data itself) gets the
    factors of the 32-bit run to float32 round-off (the 32-bit run takes its projected rows from
    the conv's own float32 output, the mixed runs project the float32 inputs themselves, since
    their outputs are bf16/fp16). Calibration leaves the module's metric states alone."""
    results = {}
    precisions = {
        "32-true": dict(precision="32-true"),
        "bf16-mixed": dict(precision="bf16-mixed"),
        # Trainer(precision="16-mixed") on CPU silently falls back to bf16-mixed (Lightning's
        # accelerator connector), so real fp16 autocast + GradScaler needs the plugin spelled out
        "16-mixed": dict(plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]),
    }
    for label, kw in precisions.items():
        pl.seed_everything(0)
        model = TinyNet()
        # also features.0 (72 weights); every row of every batch (no subsampling), to count them
        cb = LowRankFactorization({0: 0.5, 1: 0.25}, **dict(TINY, targets=Targets(min_params=50, min_features=0)), statistics=Statistics(sample_fraction=1.0))
        probe = Probe(("features.0",) + TARGETS)
        seen = {}

        class FirstBatch(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if not seen:
                    seen["structure"] = structure(pl_module)
                    seen["acc_updates"] = pl_module.val_acc._update_count
                    seen["composed"] = composed(pl_module, ("features.0",))["features.0"]

        trainer = make_trainer([cb, probe, FirstBatch()], max_epochs=2, num_sanity_val_steps=0, **kw)
        trainer.fit(model)
        assert trainer.precision_plugin.precision == label
        assert seen["structure"] == {"features.2": 4, "classifier.0": 16, "classifier.2": 5}  # before any step
        assert seen["acc_updates"] == 0  # calibration ran validation_step but left val_acc as it was
        h0 = cb.history[0]
        assert h0["epoch"] == 0 and h0["statistics"] == "calibration"
        assert h0["samples"]["classifier.0"] == 128  # one pass over the 128 validation digits
        assert all(math.isfinite(x) for x in probe.losses)
        assert probe.opt_consistent and all(probe.opt_consistent)
        results[label] = (h0["nmse"], seen["composed"])
    ref_nmse, ref_w = results["32-true"]
    for label in ("bf16-mixed", "16-mixed"):
        nmse, w = results[label]
        assert nmse["features.0"] == pytest.approx(ref_nmse["features.0"], rel=1e-6, abs=1e-9), label
        assert torch.allclose(w, ref_w, rtol=0, atol=1e-6), label
        for n in TARGETS:  # deeper layers see autocast outputs: close, not equal
            assert nmse[n] == pytest.approx(ref_nmse[n], rel=0.1, abs=2e-3), (label, n)


# --------------------------------------------------------------------------- accumulation, val interval
@pytest.mark.parametrize(
    "n_batches, statistics",
    [(8, "validation"), (7, "calibration")],
    ids=["last-run-at-epoch-end", "steps-after-last-run"],
)
def test_accumulation_and_val_check_interval(n_batches, statistics):
    """accumulate_grad_batches=2 and two validation runs per epoch (val_check_interval=0.5): the
    swap happens with no gradient pending, every trainable parameter (new ones included) gets
    gradients, the statistics are those of the last validation run (8 batches: runs after batches
    4 and 8), or, when optimizer steps followed that run (7 batches: runs after batches 3 and 6,
    then a step on batch 7), of a fresh pass at the swap, never of two runs; trainer.validate
    collects nothing."""
    pl.seed_everything(0)
    model = TinyNet(n_train=32 * n_batches)
    cb = LowRankFactorization({1: 0.5, 2: 0.25}, **TINY, statistics=Statistics(sample_fraction=1.0))
    probe = Probe()
    trainer = make_trainer([cb, probe], max_epochs=3, accumulate_grad_batches=2, val_check_interval=0.5)
    trainer.fit(model)

    r1 = {"features.2": 4, "classifier.0": 16, "classifier.2": 5}
    r2 = {"features.2": 2, "classifier.0": 8, "classifier.2": 2}
    assert probe.start == {0: dict.fromkeys(TARGETS), 1: r1, 2: r2}
    assert trainer.global_step == 3 * math.ceil(n_batches / 2)  # optimizer steps
    assert probe.unstepped_at_start == {0: 0, 1: 0, 2: 0}  # no accumulated gradient pending at the swap
    assert probe.all_grads_present and all(probe.all_grads_present)
    assert all(probe.opt_consistent)
    # two validation runs in each epoch, hooks attached in both in the epochs before a milestone
    runs = {}
    for epoch, sanity, hooks in probe.val_hooks:
        if not sanity:
            runs.setdefault(epoch, []).append(hooks)
    per_run = 128 // 64  # validation batches per run
    assert runs == {0: [3] * 2 * per_run, 1: [3] * 2 * per_run, 2: [0] * 2 * per_run}
    assert [h["statistics"] for h in cb.history] == [statistics, statistics]
    assert [h["samples"]["classifier.0"] for h in cb.history] == [128, 128]  # one run's worth, not two
    assert all(math.isfinite(x) for x in probe.losses)

    probe.val_hooks.clear()
    trainer.validate(model, verbose=False)
    assert probe.val_hooks and all(h == 0 for _, _, h in probe.val_hooks)
    assert no_hooks_left(model)


# --------------------------------------------------------------------------- modes
def _spy_candidates(monkeypatch) -> list:
    seen = []
    real = refactorize_module.build_candidates

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(refactorize_module, "build_candidates", spy)
    monkeypatch.setattr(passes_module, "build_candidates", spy)  # the callback solves pass by pass
    return seen


def test_max_nmse_mode(monkeypatch):
    """Each layer gets the smallest rank whose NMSE on the statistics is within the target."""
    candidates = _spy_candidates(monkeypatch)
    pl.seed_everything(0)
    model = TinyNet()
    cb = LowRankFactorization({1: 0.01, 2: 0.05}, mode="max_nmse", **TINY, statistics=Statistics(sample_fraction=1.0))
    make_trainer([cb], max_epochs=3).fit(model)
    assert len(candidates) == 2 and cb.done == [1, 2]
    for target, cands, hist in zip((0.01, 0.05), candidates, cb.history):
        for n, rank in hist["ranks"].items():
            curve = cands[n].decomposition.nmse_curve
            current = cands[n].view.rank
            if rank is None or rank == current:
                continue  # unchanged (no rank within target saves anything)
            assert curve[rank] <= target < curve[rank - 1], (n, rank)
            assert hist["nmse"][n] == pytest.approx(float(curve[rank]))
    assert any(r is not None for r in cb.ranks.values())


def test_param_budget_mode():
    """param_budget keeps the given fraction of the targeted layers' original dense weights.
    (Full sampling: every row of the validation digits, so the statistics and the allocation do
    not depend on which rows a sampled collection would draw.)"""
    pl.seed_everything(0)
    model = TinyNet()
    dense = sum(model.get_submodule(n).weight.numel() for n in TARGETS)
    cb = LowRankFactorization({1: 0.5, 2: 0.3}, mode="param_budget", **TINY, statistics=Statistics(sample_fraction=1.0))
    probe = Probe()
    make_trainer([cb, probe], max_epochs=3).fit(model)
    dims = {"features.2": (72, 16), "classifier.0": (256, 32), "classifier.2": (32, 10)}
    for epoch, fraction in ((1, 0.5), (2, 0.3)):
        kept = 0
        for n, (d_in, d_out) in dims.items():
            rank = probe.start[epoch][n]
            kept += d_in * d_out if rank is None else rank * (d_in + d_out)
        assert kept <= fraction * dense, (epoch, kept, fraction * dense)
        assert kept >= 0.8 * fraction * dense, (epoch, kept, fraction * dense)  # the budget is used, not wasted
    assert probe.start[2] != probe.start[1]



def test_budget_probe_and_output_shift_share_one_fetch_of_the_validation_batches(monkeypatch):
    """At a param_budget milestone with output_batches > 0 the first validation batches are read
    once, and each of the two measurements gets its own count of them."""
    import factorize_plugin.engine.output_shift as output_shift_module
    import factorize_plugin.engine.speed as speed_module

    calls = []
    real = output_shift_module.first_batches
    for module in (milestone_module, speed_module, output_shift_module):  # wherever imported
        monkeypatch.setattr(module, "first_batches", lambda h, n: calls.append(n) or real(h, n), raising=False)
    pl.seed_everything(0)
    cb = LowRankFactorization({1: 0.5}, mode="param_budget", **TINY, budget_batches=2, output_batches=1)
    make_trainer([cb], max_epochs=2).fit(TinyNet())
    assert calls == [2]
    assert 0 <= cb.history[0]["output_nmse"] < 1

# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "schedule, mode",
    [({1: 8, 3: 16}, "rank"), ({1: 0.25, 3: 0.5}, "rank"), ({1: 0.1, 2: 0.05}, "max_nmse"), ({1: 0.3, 2: 0.6}, "param_budget")],
)
def test_schedule_that_raises_rank_is_refused(schedule, mode):
    with pytest.raises(ValueError, match="goes back up at epoch"):
        LowRankFactorization(schedule, mode=mode)


@pytest.mark.parametrize("schedule", [{}, {-1: 0.5}, {1: 0}, {1: 1.5}])
def test_bad_schedule_values_are_refused(schedule):
    with pytest.raises(ValueError):
        LowRankFactorization(schedule)


def test_parameter_copying_callbacks_are_refused():
    copies = [StochasticWeightAveraging(swa_lrs=1e-2)]
    try:
        from lightning.pytorch.callbacks import EMAWeightAveraging

        copies.append(EMAWeightAveraging())
    except ImportError:  # older Lightning
        pass
    for other in copies:
        model = TinyNet()
        before = state_dict_cpu(model)
        trainer = make_trainer([LowRankFactorization({1: 0.5}, **TINY), other], max_epochs=2)
        with pytest.raises(ValueError, match=f"cannot run with \\['{type(other).__name__}'\\].*copies of the parameters"):
            trainer.fit(model)
        assert structure(model) == dict.fromkeys(TARGETS)
        assert before.keys() == model.state_dict().keys()


def test_unsupported_strategies_are_refused():
    """FSDP1 cannot be built on CPU and DeepSpeed is not installed: the real strategy classes are
    checked through the callback's setup (what Trainer.fit calls first); FSDP2 with a
    tensor-parallel mesh dimension is refused too."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    strategies = {
        FSDPStrategy(): "FSDPStrategy",
        DeepSpeedStrategy.__new__(DeepSpeedStrategy): "DeepSpeedStrategy",
        ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2): "tensor parallelism",
    }
    for strategy, named in strategies.items():
        fake_trainer = types.SimpleNamespace(strategy=strategy, callbacks=[])
        with pytest.raises(NotImplementedError, match=named):
            LowRankFactorization({1: 0.5}).setup(fake_trainer, TinyNet(), "fit")


def test_target_pattern_matching_nothing_is_refused():
    trainer = make_trainer([LowRankFactorization({1: 0.5}, targets=["decoder.*"])], max_epochs=1)
    with pytest.raises(ValueError, match=r"'decoder\.\*' matches no module"):
        trainer.fit(TinyNet())
    trainer = make_trainer([LowRankFactorization({1: 0.5}, targets=Targets(min_params=10**6))], max_epochs=1)
    with pytest.raises(ValueError, match="no layer to factorize"):
        trainer.fit(TinyNet())


def test_nan_activations_name_the_layer_and_leave_the_model_intact():
    """NaN inputs to classifier.2 during the validation run before the milestone: the error names
    the layer, and the model, the optimizer and the hooks are as they were before the milestone."""
    pl.seed_everything(0)
    model = TinyNet()

    def poison(module, args, output):
        return output * float("nan") if not module.training and not trainer.sanity_checking else output

    model.classifier[1].register_forward_hook(poison)  # the ReLU feeding classifier.2
    probe = Probe()
    saved = {}

    class SaveAtEpochEnd(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            saved["sd"] = state_dict_cpu(pl_module)

    trainer = make_trainer([LowRankFactorization({1: 0.5}, **TINY), probe, SaveAtEpochEnd()], max_epochs=3)
    with pytest.raises(ValueError, match=r"layer 'classifier\.2'.*(NaN|not finite)"):
        trainer.fit(model)
    assert structure(model) == dict.fromkeys(TARGETS)
    after = state_dict_cpu(model)
    assert after.keys() == saved["sd"].keys() and all(torch.equal(after[k], saved["sd"][k]) for k in after)
    assert optimizer_ids(trainer.optimizers[0]) == trainable_ids(model)
    assert all(not model.get_submodule(n)._forward_pre_hooks and not model.get_submodule(n)._forward_hooks for n in TARGETS)


def test_optimizer_edit_keeps_each_parameter_in_its_group():
    """Unit level: a factor of a weight takes the weight's group and place, the new bias the old
    bias's group ("no weight decay on biases" keeps its meaning); others keep their state."""
    from factorize_plugin.layers import FactorizedLinear
    from factorize_plugin.surgery.swap.optim import replace_in_optimizer

    lin, other = torch.nn.Linear(8, 6), torch.nn.Linear(6, 2)
    opt = torch.optim.AdamW(
        [{"params": [lin.weight, other.weight], "weight_decay": 0.1}, {"params": [lin.bias, other.bias], "weight_decay": 0.0}]
    )
    other(lin(torch.randn(4, 8))).sum().backward()
    opt.step()
    kept = {k: v.clone() for k, v in opt.state[other.weight].items()}
    pair = FactorizedLinear(8, 6, 3)
    groups = opt.param_groups
    replace_in_optimizer(opt, [(dict(lin.named_parameters()), dict(pair.named_parameters()))])
    assert opt.param_groups is groups
    ids = [[id(p) for p in g["params"]] for g in opt.param_groups]
    assert ids == [[id(pair.first.weight), id(pair.second.weight), id(other.weight)], [id(pair.second.bias), id(other.bias)]]
    assert lin.weight not in opt.state and lin.bias not in opt.state
    assert all(torch.equal(opt.state[other.weight][k], v) for k, v in kept.items())
    other(pair(torch.randn(4, 8))).sum().backward()
    opt.step()  # works, and the new parameters' state goes on from the dense layer's (carry.py)
    assert float(opt.state[pair.first.weight]["step"]) == float(opt.state[pair.second.bias]["step"]) == 2
    assert float(opt.state[other.bias]["step"]) == 2


def test_no_validation_data_is_refused_clearly():
    model = TinyNet()
    trainer = make_trainer([LowRankFactorization({1: 0.5}, **TINY)], max_epochs=2, limit_val_batches=0)
    with pytest.raises(RuntimeError, match="needs validation data"):
        trainer.fit(model)
    assert structure(model) == dict.fromkeys(TARGETS)


def test_collectors_know_how_many_validation_batches_are_coming(monkeypatch):
    """The calibration pass (key 0) and the validation run before milestone 1 both tell the
    collector the run's length, so that "auto" sampling spreads its minimum rows over every batch."""
    seen = []
    real = pipeline_module.ActivationCollector  # the callback builds its collectors through the shared pipeline

    def spy(*args, **kwargs):
        seen.append(kwargs.get("expected_batches"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "ActivationCollector", spy)
    pl.seed_everything(0)
    cb = LowRankFactorization({0: 0.5, 1: 0.25}, **TINY)
    make_trainer([cb], max_epochs=2, num_sanity_val_steps=0, limit_val_batches=3).fit(TinyNet(n_val=256))
    assert [h["statistics"] for h in cb.history] == ["calibration", "validation"]
    assert seen == [3, 3]
