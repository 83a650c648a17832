"""The private Lightning / torchmetrics internals the callback relies on still exist and behave as
``integration/lightning_internals.py`` assumes. A Lightning release that moves them fails here."""

import lightning.pytorch as pl
import torch
import torchmetrics

from factorize_plugin.engine.output_shift import first_batches
from factorize_plugin.integration.lightning_host import LightningHost
from factorize_plugin.integration.lightning_internals import (
    preserved_metric_states,
    silenced_logging,
    start_method,
    validation_loaders,
    validation_source_defined,
)
from lightning_helpers import TinyNet


class _LoaderProbe(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.loaders, self.limits = validation_loaders(trainer)
        state = torch.random.get_rng_state()
        self.batches = first_batches(LightningHost(trainer, pl_module), 5)
        self.rng_kept = torch.equal(state, torch.random.get_rng_state())


def _fit_one_epoch(model: pl.LightningModule, probe: pl.Callback, batches: int) -> None:
    """One quiet epoch of ``batches`` training and validation batches, with ``probe`` attached."""
    pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=batches, limit_val_batches=batches, callbacks=[probe],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    ).fit(model)  # fmt: skip


def test_validation_loaders_are_the_loops_own_with_limits():
    probe = _LoaderProbe()
    _fit_one_epoch(TinyNet(), probe, batches=2)
    assert len(probe.loaders) == 1 and probe.limits == [2]
    x, y = next(iter(probe.loaders[0]))
    assert x.shape[1:] == (1, 8, 8) and y.dtype == torch.int64
    # the first batches, capped by limit_val_batches, without touching the training run's RNG
    assert len(probe.batches) == 2 and torch.equal(probe.batches[0][0], x) and probe.rng_kept


def test_start_method_of_each_ddp_flavour():
    for strategy, expected in (("ddp_spawn", "spawn"), ("ddp_fork", "fork"), ("ddp", None)):
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_progress_bar=False)
        assert start_method(trainer.strategy) == expected, strategy
    assert start_method(pl.Trainer(accelerator="cpu", devices=1, logger=False).strategy) is None


def test_metric_state_is_put_back():
    model = TinyNet()
    metric = torchmetrics.MeanMetric()
    model.extra_metric = metric
    metric.update(torch.tensor([1.0, 3.0]))
    assert metric._update_count == 1 and hasattr(metric, "_computed")
    with preserved_metric_states(model):
        metric.update(torch.tensor([100.0]))
        assert float(metric.compute()) != 2.0
    assert metric._update_count == 1 and float(metric.compute()) == 2.0


def test_silenced_logging_restores_the_methods():
    model = TinyNet()
    with silenced_logging(model):
        model.log("x", 1.0)  # outside a loop Lightning would raise here
        model.log_dict({"x": 1.0})
    assert model.log.__func__ is pl.LightningModule.log


class _SourceProbe(pl.Callback):
    def setup(self, trainer, pl_module, stage):
        self.defined = validation_source_defined(trainer)


def test_validation_source_is_readable_at_setup():
    for with_val in (True, False):
        model = TinyNet()
        if not with_val:
            model.val_dataloader = None
        probe = _SourceProbe()
        _fit_one_epoch(model, probe, batches=1)
        assert probe.defined is with_val


# ------------------------------------------------------------------ strategies and the DDP wrapper
import pytest  # noqa: E402
from lightning.pytorch import strategies  # noqa: E402

from factorize_plugin.integration.lightning_internals import check_strategy, rewrap_ddp  # noqa: E402


def _bare(cls):
    """An instance without running ``__init__`` (DeepSpeed / XLA need their packages to be built)."""
    return object.__new__(cls)


@pytest.mark.parametrize(
    "cls",
    [strategies.FSDPStrategy, strategies.DeepSpeedStrategy, strategies.XLAStrategy, strategies.SingleDeviceXLAStrategy],
)  # fmt: skip
def test_check_strategy_refuses_sharding_strategies_by_isinstance(cls):
    with pytest.raises(NotImplementedError, match=rf"does not support {cls.__name__}.*strategy='ddp'"):
        check_strategy(_bare(cls))


@pytest.mark.parametrize("cls", [strategies.FSDPStrategy, strategies.DeepSpeedStrategy])
def test_fsdp1_and_deepspeed_refusals_name_fsdp2(cls):
    with pytest.raises(NotImplementedError, match=r"ModelParallelStrategy\(data_parallel_size=<processes>, "
                                                  r"tensor_parallel_size=1\) with fully_shard"):
        check_strategy(_bare(cls))


def test_check_strategy_accepts_fsdp2_and_refuses_tensor_parallelism():
    check_strategy(strategies.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    with pytest.raises(NotImplementedError, match=r"tensor parallelism.*size 2.*tensor_parallel_size=1"):
        check_strategy(strategies.ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))


def test_check_strategy_refuses_a_subclass_and_anything_it_does_not_know():
    class MyFSDP(strategies.FSDPStrategy):  # a name without "FSDP" in it would have passed a name match
        pass

    class Custom(strategies.ParallelStrategy):
        barrier = broadcast = model_to_device = reduce = root_device = None

    for strategy in (_bare(MyFSDP), _bare(Custom), object()):
        with pytest.raises(NotImplementedError, match="does not support"):
            check_strategy(strategy)


def test_check_strategy_accepts_single_device_and_ddp_family():
    check_strategy(strategies.SingleDeviceStrategy(torch.device("cpu")))
    check_strategy(strategies.DDPStrategy())
    check_strategy(strategies.DDPStrategy(start_method="spawn"))

    class MyDDP(strategies.DDPStrategy):
        pass

    check_strategy(MyDDP())


class _FakeDDPStrategy:
    """What ``rewrap_ddp`` touches on a DDP strategy: ``model``, ``lightning_module``, ``configure_ddp``."""

    def __init__(self, model, module):
        self.model, self.lightning_module, self.configured = model, module, 0

    def configure_ddp(self):
        self.configured += 1
        self.model = ("wrapped", self.model)


class _Trainer:
    def __init__(self, strategy):
        self.strategy = strategy


def test_rewrap_ddp_rebuilds_the_wrapper_around_the_lightning_module(monkeypatch):
    class FakeDDP(torch.nn.Module):
        pass

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", FakeDDP)
    module = TinyNet()
    strategy = _FakeDDPStrategy(FakeDDP(), module)
    rewrap_ddp(_Trainer(strategy))
    assert strategy.configured == 1 and strategy.model == ("wrapped", module)


def test_rewrap_ddp_does_nothing_without_a_ddp_wrapper():
    module = TinyNet()
    single = strategies.SingleDeviceStrategy(torch.device("cpu"))
    rewrap_ddp(_Trainer(single))  # no configure_ddp: untouched
    unwrapped = _FakeDDPStrategy(module, module)  # a DDP strategy before its wrapper exists
    rewrap_ddp(_Trainer(unwrapped))
    assert unwrapped.configured == 0 and unwrapped.model is module


def test_rewrap_ddp_uses_the_strategy_api_it_assumes():
    assert callable(getattr(strategies.DDPStrategy, "configure_ddp", None))
    assert isinstance(getattr(strategies.DDPStrategy, "model", None), property)
    assert isinstance(getattr(strategies.DDPStrategy, "lightning_module", None), property)


def test_training_position_after_a_fresh_start_and_each_kind_of_resume(tmp_path):
    """``training_position`` at ``on_train_start``: where training goes on after a checkpoint
    written at an epoch's end, in its validation run, or mid-epoch (Lightning's loop progress)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from factorize_plugin.integration.lightning_internals import training_position

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.position = training_position(trainer)

    def fit(ckpt=None, save=None):
        probe = Probe()
        pl.Trainer(
            accelerator="cpu", devices=1, max_epochs=3, callbacks=[probe] + ([save] if save else []), logger=False,
            enable_checkpointing=save is not None, enable_progress_bar=False, enable_model_summary=False,
        ).fit(TinyNet(), ckpt_path=ckpt)  # fmt: skip
        return probe.position

    at_end = ModelCheckpoint(dirpath=tmp_path / "end", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    in_validation = ModelCheckpoint(
        dirpath=tmp_path / "val", filename="{epoch}", save_top_k=-1, monitor="val_loss", save_on_train_epoch_end=False
    )
    mid = ModelCheckpoint(dirpath=tmp_path / "mid", filename="{step}", save_top_k=-1, every_n_train_steps=11)
    assert fit(save=at_end) == (0, 0)
    fit(save=in_validation)
    fit(save=mid)
    assert fit(str(tmp_path / "end" / "epoch=1.ckpt")) == (2, 0)
    assert fit(str(tmp_path / "val" / "epoch=1.ckpt")) == (1, 8)  # epoch 1 resumed with its 8 batches behind
    assert fit(str(tmp_path / "mid" / "step=11.ckpt")) == (1, 3)  # 8 batches per epoch: 3 of epoch 1 done
