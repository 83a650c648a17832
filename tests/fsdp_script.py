"""Two-process CPU/gloo run of ``LowRankFactorization`` on the GPT of ``examples/gpt_task.py``,
under FSDP2 (``ModelParallelStrategy``, every projection its own ``fully_shard`` unit) or under
DDP, with the same data order (run by tests/test_fsdp.py).

``python tests/fsdp_script.py OUT_DIR fsdp|ddp|auto``: Lightning re-launches this script as rank 1. A
2-epoch run with milestones at epochs 0 and 1 (``{0: 0.5, 1: 0.25}``). After each milestone
(and at the end) every rank records its targeted layers' composed weights (gathered), its local parameter and
optimizer-state bytes, and the most layers the package held gathered at once; at the end, the
full state dict. Under FSDP2 a second fit resumes a fresh dense model from the distributed
checkpoint written at the end of epoch 0 (after the first milestone). Each rank writes
``OUT_DIR/<mode>_rank<r>.pt``. ``auto``: ``schedule="auto"`` under FSDP2 (its speed decision off),
4 epochs, the history and final weights only.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import torch  # noqa: E402

torch.set_num_threads(1)

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from examples.gpt_task import GPTTask  # noqa: E402
from factorize_plugin import LowRankFactorization, Statistics  # noqa: E402
from factorize_plugin.layers import weight_matrix  # noqa: E402
from factorize_plugin.layers.sharded import GATHERED, is_unit  # noqa: E402

MODEL = dict(block=16, dim=32, layers=2, heads=2, batch_size=8, train_windows=64, val_windows=32, lr=1e-3,
             max_steps=8, corpus_bytes=200_000)  # fmt: skip
SCHEDULE = {0: 0.5, 1: 0.25}
TARGETS = [f"net.blocks.{i}.{layer}" for i in range(2) for layer in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]


def local_bytes(tensors) -> int:
    """Bytes this process holds for ``tensors`` (a DTensor's local shard)."""
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            local = t.to_local() if hasattr(t, "to_local") else t
            total += local.numel() * local.element_size()
    return total


def full_state(model: torch.nn.Module) -> dict:
    """The whole state dict on every process (DTensors gathered: a collective)."""
    out = {}
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            v = v.full_tensor() if hasattr(v, "full_tensor") else v
            out[k] = v.detach().clone()
    return out


class Recorder(pl.Callback):
    """After the factorization callback's epoch start (a milestone), what each process holds."""

    def __init__(self) -> None:
        self.after: list[dict] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.record(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.record(trainer, pl_module)

    def record(self, trainer, pl_module):
        peak = GATHERED.peak  # the milestone's (before this record's own reads below)
        for module in pl_module.modules():
            if is_unit(module):
                module.reshard()  # the root keeps its parameters gathered after a forward: count shards only
        optimizer = trainer.optimizers[0]
        state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.ndim]
        self.after.append({
            "epoch": trainer.current_epoch,
            "composed": {n: weight_matrix(pl_module.get_submodule(n))[0] for n in TARGETS},
            "param_bytes": local_bytes(pl_module.parameters()),
            "param_full": sum(p.numel() * p.element_size() for p in pl_module.parameters()),
            "optimizer_bytes": local_bytes(state),
            "gathered_peak": peak,
            "kinds": {n: type(pl_module.get_submodule(n)).__name__ for n in TARGETS},
        })  # fmt: skip
        GATHERED.reset()  # (after the composed weights were read: the next record sees the next milestone's)


def make_trainer(mode: str, callbacks: list, max_epochs: int = 2, **kwargs) -> pl.Trainer:
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if mode != "ddp" else "ddp"
    return pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=2, max_epochs=max_epochs, callbacks=callbacks, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip


def main(out: str, mode: str) -> None:
    if mode == "auto":  # schedule="auto" under FSDP2: the watch, then ParamBudget(0.5, "macs") with its probe
        pl.seed_everything(0)
        model = GPTTask(**MODEL)
        cb = LowRankFactorization("auto", targets="net.blocks.*", statistics=Statistics(sample_fraction=1.0), verbose=False)
        trainer = make_trainer(mode, [cb], max_epochs=4)
        trainer.fit(model)
        result = {"history": cb.history, "final": full_state(model)}
        torch.save(result, os.path.join(out, f"{mode}_rank{trainer.global_rank}.pt"))
        return
    pl.seed_everything(0)
    model = GPTTask(**MODEL)
    cb = LowRankFactorization(SCHEDULE, targets="net.blocks.*", statistics=Statistics(sample_fraction=1.0), verbose=False, speed_guard=False)
    recorder = Recorder()
    ckpt = ModelCheckpoint(dirpath=os.path.join(out, f"{mode}_ckpt"), filename="{epoch}", save_top_k=-1)
    trainer = make_trainer(mode, [cb, recorder, ckpt])
    trainer.fit(model)
    result = {
        "world_size": trainer.world_size,
        "history": cb.history,
        "after": recorder.after,
        "final": full_state(model),
    }
    if mode == "fsdp":
        pl.seed_everything(0)
        fresh = GPTTask(**MODEL)
        cb2 = LowRankFactorization(SCHEDULE, targets="net.blocks.*", statistics=Statistics(sample_fraction=1.0), verbose=False, speed_guard=False)
        resumed = make_trainer(mode, [cb2], enable_checkpointing=False)
        resumed.fit(fresh, ckpt_path=os.path.join(out, f"{mode}_ckpt", "epoch=0.ckpt"))
        result.update(resumed_history=cb2.history, resumed_final=full_state(fresh))
    torch.save(result, os.path.join(out, f"{mode}_rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
