"""A trained GPT to compress (issue 30, item 2): the byte-level GPT of ``examples/gpt_task.py`` in
the CPU configuration of ``benchmarks/bench_lm_tradeoff.py`` (d=256, 4 layers, 4 heads, block 64,
batch 16, the whole standard library split by file, peak learning rate 1e-3), trained for 960
optimizer steps (4x that benchmark's 240), cached in a git-ignored folder keyed by its configuration.

    python examples/trained_gpt.py [--rebuild] [--steps 960]      # builds the cache if missing (~5 CPU-min)

``load_trained_gpt(config)`` returns ``(model, info)``: the trained ``GPT`` (eval mode) and what
the cache records (the configuration, its hash, the loss curve, the wall and CPU time it took).
The cache lives in ``.cache/trained_gpt/<hash>/`` at the repository root (``model.pt``: the
``GPT``'s state_dict; ``info.json``) and is rebuilt when missing.

Training: a plain PyTorch loop (faster than Lightning's, nothing else differs) that trains what
``examples/gpt_train.run`` trains for the trade-off benchmark, with its pieces reused rather than
copied: the model and its seeded initialization (``GPTTask``), the optimizer and learning-rate
schedule (``GPTTask.configure_optimizers``: AdamW, betas (0.9, 0.95), weight decay 0.1 on the
matrices, linear warm-up over 1/20 of the steps then cosine decay to 0.1x, stepped every optimizer
step), the training windows (``GPTTask.train_dataloader``: ``steps / epochs * batch`` random windows
per epoch, re-drawn each epoch as ``reload_dataloaders_every_n_epochs=1`` does) and the validation
windows (``GPTTask.val_dataloader``: 256 evenly spaced windows, batches of 64). Train loss is
recorded every step, validation loss every ``val_every`` steps (and at step 0). One torch thread;
seeded and deterministic (the same configuration gives the same weights). On the tiny dry-run
configuration its validation losses equal ``gpt_train.run``'s (Lightning) exactly. The default
configuration took 305 s wall, 290 s CPU (one thread, a shared 2-core machine) to a validation
loss of 1.755 (``benchmarks/results/trained_gpt_curve.json``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: examples.*

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from benchmarks._common import package_version
from examples.gpt_task import GPT, GPTTask

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "trained_gpt"
FORMAT = 1  # bump when the training code changes what a configuration produces


@dataclasses.dataclass(frozen=True)
class TrainedGPTConfig:
    """What the trained model depends on (all of it goes into the cache key).

    The defaults: ``bench_lm_tradeoff.config(gpu=False, ...)``'s model and learning rate, 960 steps,
    24 epochs (40 steps each, that benchmark's epoch length: 640 fresh random windows per epoch)."""

    dim: int = 256
    layers: int = 4
    heads: int = 4
    block: int = 64
    batch_size: int = 16
    val_windows: int = 256
    corpus: str = "full"
    lr: float = 1e-3
    steps: int = 960
    epochs: int = 24
    seed: int = 0
    val_every: int = 60

    def __post_init__(self) -> None:
        if self.steps % self.epochs:
            raise ValueError(f"steps ({self.steps}) must be a multiple of epochs ({self.epochs})")

    def model_kwargs(self) -> dict[str, Any]:
        """The ``GPTTask`` keyword arguments that make the model and its data (``max_steps``, the
        windows per epoch and the seed included)."""
        return dict(dim=self.dim, layers=self.layers, heads=self.heads, block=self.block, batch_size=self.batch_size,
                    val_windows=self.val_windows, corpus=self.corpus, lr=self.lr, max_steps=self.steps,
                    train_windows=self.steps // self.epochs * self.batch_size, seed=self.seed)  # fmt: skip

    def key(self) -> str:
        """A 16-hex-digit hash of the configuration (and ``FORMAT``): the cache folder's name."""
        text = json.dumps({"format": FORMAT, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def dry_run_config() -> TrainedGPTConfig:
    """A tiny model trained for a few steps (seconds): for ``--dry-run`` benchmarks and tests."""
    return TrainedGPTConfig(dim=32, layers=2, heads=2, block=16, batch_size=4, val_windows=32, steps=24, epochs=2,
                            val_every=12)  # fmt: skip


def make_task(config: TrainedGPTConfig) -> GPTTask:
    """The seeded, untrained ``GPTTask`` of ``config`` (``pl.seed_everything`` as ``gpt_train.run``)."""
    pl.seed_everything(config.seed, verbose=False)
    return GPTTask(**config.model_kwargs())


def train_loader(task: GPTTask, epoch: int) -> DataLoader:
    """The training batches of ``epoch``: [batch, block] int64 inputs and next-byte targets."""
    loader = task.train_dataloader()
    loader.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
    return loader


def val_batches(task: GPTTask) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The validation batches ([64, block] inputs, targets), the same windows every call."""
    return list(task.val_dataloader())


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean cross-entropy per byte (nats) of ``model`` (tokens [B, T] -> logits [B, T, V]) over
    ``batches``, weighted by batch size (Lightning's ``on_epoch`` mean); eval mode while it runs."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        total += float(torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())) * len(x)
        count += len(x)
    model.train(was_training)
    return total / count


def train(config: TrainedGPTConfig, progress: Optional[Callable[[str], None]] = print,
          print_every: int = 50) -> tuple[GPT, dict[str, Any]]:  # fmt: skip
    """Trains ``config``'s model from its seed; returns the ``GPT`` and the run's record
    (``train_loss``: one value per step; ``val_curve``: step, val loss, wall and CPU seconds)."""
    task = make_task(config)
    optimizers = task.configure_optimizers()
    opt, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    val = val_batches(task)
    t0, c0 = time.perf_counter(), time.process_time()
    train_loss: list[float] = []
    val_curve: list[dict[str, float]] = []

    def validate(step: int) -> None:
        loss = mean_loss(task.net, val)
        val_curve.append({"step": step, "val_loss": loss, "seconds": time.perf_counter() - t0,
                          "cpu_seconds": time.process_time() - c0})  # fmt: skip

    validate(0)
    task.train()
    step = 0
    for epoch in range(config.epochs):
        for batch in train_loader(task, epoch):
            loss = task._loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            scheduler.step()
            step += 1
            train_loss.append(float(loss.detach()))
            if step % config.val_every == 0 or step == config.steps:
                validate(step)
            if progress is not None and (step % print_every == 0 or step == config.steps):
                recent = train_loss[-print_every:]
                progress(f"step {step:5d}/{config.steps}  train loss {sum(recent) / len(recent):.4f}"
                         f"  val {val_curve[-1]['val_loss']:.4f} (step {val_curve[-1]['step']})"
                         f"  {time.perf_counter() - t0:7.1f} s")  # fmt: skip
    assert step == config.steps, (step, config.steps)
    info = {
        "config": dataclasses.asdict(config), "key": config.key(), "steps": step,
        "train_loss": train_loss, "val_curve": val_curve, "final_val_loss": val_curve[-1]["val_loss"],
        "train_seconds": time.perf_counter() - t0, "train_cpu_seconds": time.process_time() - c0,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "params": sum(p.numel() for p in task.net.parameters()), "built_with": package_version(),
    }  # fmt: skip
    task.net.eval()
    return task.net, info


def cache_dir(config: TrainedGPTConfig, root: Optional[Path] = None) -> Path:
    """``<root>/<config.key()>`` (``root`` defaults to ``.cache/trained_gpt`` in the repository)."""
    return Path(root if root is not None else CACHE) / config.key()


def build(config: TrainedGPTConfig, root: Optional[Path] = None,
          progress: Optional[Callable[[str], None]] = print) -> tuple[GPT, dict[str, Any]]:  # fmt: skip
    """Trains ``config`` and writes its cache folder atomically (a killed build leaves none)."""
    model, info = train(config, progress)
    target = cache_dir(config, root)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    torch.save(model.state_dict(), tmp / "model.pt")
    (tmp / "info.json").write_text(json.dumps(info, indent=1))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return model, info


def load_trained_gpt(config: Optional[TrainedGPTConfig] = None, root: Optional[Path] = None, rebuild: bool = False,
                     progress: Optional[Callable[[str], None]] = print) -> tuple[GPT, dict[str, Any]]:  # fmt: skip
    """The trained ``GPT`` of ``config`` (default: ``TrainedGPTConfig()``), in eval mode, and its
    ``info`` (``info["cached"]``: whether it came from the cache). Trains and caches it first when
    the cache folder is missing (or ``rebuild``)."""
    config = config or TrainedGPTConfig()
    folder = cache_dir(config, root)
    if rebuild or not (folder / "info.json").exists():
        model, info = build(config, root, progress)
        return model, {**info, "cached": False, "path": str(folder)}
    info = json.loads((folder / "info.json").read_text())
    model = make_task(config).net
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    return model.eval(), {**info, "cached": True, "path": str(folder)}


def curve_record(info: dict[str, Any]) -> dict[str, Any]:
    """The commit-ready record of a trained model's run: its configuration and key, the loss curve
    (train loss per step, val loss every ``val_every`` steps), the time it took, where it was built
    (``built_with``) and who wrote the record (``version``: ``benchmarks/_common.package_version``)."""
    keys = ("config", "key", "steps", "final_val_loss", "train_seconds", "train_cpu_seconds", "threads", "params",
            "built_with", "val_curve", "train_loss")  # fmt: skip
    return {"benchmark": "trained_gpt_curve", "version": package_version(), **{k: info.get(k) for k in keys}}


def write_curve(info: dict[str, Any], json_path: Path, png_path: Optional[Path] = None) -> bool:
    """Writes ``curve_record(info)`` to ``json_path`` and, when matplotlib is installed, the curve
    to ``png_path``; returns whether a PNG was written."""
    json_path.write_text(json.dumps(curve_record(info), indent=1))
    if png_path is None:
        return False
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    ax.plot(range(1, len(info["train_loss"]) + 1), info["train_loss"], lw=0.6, alpha=0.6, label="train (per step)")
    val = info["val_curve"]
    ax.plot([p["step"] for p in val], [p["val_loss"] for p in val], "o-", ms=3, label="validation")
    c = info["config"]
    ax.set_title(f"GPT d={c['dim']} x {c['layers']} layers on the stdlib: {info['steps']} steps, "
                 f"{info['train_cpu_seconds'] / 60:.1f} CPU-min", fontsize=9)  # fmt: skip
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_ylim(min(p["val_loss"] for p in val) - 0.3, min(5.6, max(info["train_loss"]) + 0.1))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=960)
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--rebuild", action="store_true", help="train again even when the cache has it")
    parser.add_argument("--dry-run", action="store_true", help="a tiny model, a few steps, cached under a temp folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--curve", default=None, help="write the loss curve record here (a .json; a .png beside it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.dry_run:
        config, root = dry_run_config(), Path(tempfile.gettempdir()) / "trained_gpt_dry_run"
    else:
        config, root = TrainedGPTConfig(steps=args.steps, epochs=args.epochs), None
    print(f"configuration {config.key()}: {dataclasses.asdict(config)}", flush=True)
    _, info = load_trained_gpt(config, root, rebuild=args.rebuild, progress=lambda s: print(s, flush=True))
    print(f"{'cached' if info['cached'] else 'built'} at {info['path']}: final val loss {info['final_val_loss']:.4f}, "
          f"trained in {info['train_seconds']:.0f} s wall, {info['train_cpu_seconds']:.0f} s CPU")  # fmt: skip
    if args.curve:
        path = Path(args.curve)
        write_curve(info, path, path.with_suffix(".png"))
    return info


if __name__ == "__main__":
    main()
