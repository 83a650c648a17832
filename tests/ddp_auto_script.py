"""Two-process CPU/gloo run of ``schedule="auto"`` under ``strategy="ddp"`` (run by
tests/test_auto_schedule.py). ``python tests/ddp_auto_script.py OUT_DIR``; Lightning re-launches it
as rank 1. Two fits of ``SettlingNet`` (spectra settle after epoch 2): (1) as it is; (2) with rank
1's local stable ranks disturbed (x1.5 at every other validation run: alone, rank 1 would never
see them settle while rank 0 would), so that only the all-reduced signal can keep the ranks'
decisions equal. Each rank writes ``OUT_DIR/rank<r>.pt``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

torch.set_num_threads(1)

import lightning.pytorch as pl  # noqa: E402

import factorize_plugin.integration.auto_schedule as auto_module  # noqa: E402
from factorize_plugin import Auto, FixedRank, LowRankFactorization  # noqa: E402
from lightning_helpers import DDP_CALLBACK_KWARGS, DDP_MODEL_KWARGS, SettlingNet, structure  # noqa: E402

_real = auto_module.stable_ranks
local: list[dict] = []
disturb = {"on": False, "calls": 0}


def _spy(layers, iterations):
    values = _real(layers, iterations)
    if disturb["on"] and int(os.environ.get("LOCAL_RANK", "0")) == 1:
        disturb["calls"] += 1
        values = {n: v * (1.5 if disturb["calls"] % 2 else 1.0) for n, v in values.items()}
    local.append(dict(values))
    return values


auto_module.stable_ranks = _spy


def fit() -> dict:
    pl.seed_everything(0)
    model = SettlingNet(settle_epoch=2, **DDP_MODEL_KWARGS)
    cb = LowRankFactorization(Auto(target=FixedRank(0.5)), **DDP_CALLBACK_KWARGS)
    trainer = pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=6, callbacks=[cb], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
    )  # fmt: skip
    local.clear()
    trainer.fit(model)
    return {"history": cb.history, "local": list(local), "structure": structure(model), "rank": trainer.global_rank}


def main(out: str) -> None:
    plain = fit()
    disturb["on"] = True
    disturbed = fit()
    torch.save({"plain": plain, "disturbed": disturbed}, os.path.join(out, f"rank{plain['rank']}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
