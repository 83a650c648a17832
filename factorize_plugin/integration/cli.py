"""``python -m factorize_plugin`` / ``factorize-plugin``: LightningCLI in subclass mode.

Any LightningModule / LightningDataModule is given by ``class_path``; ``LowRankFactorization``
goes under ``trainer.callbacks``. Example: ``factorize-plugin fit --config examples/mnist.yaml``.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from ..surgery.checkpoint import enable_factorized_loading


class FactorizeCLI(LightningCLI):
    """LightningCLI whose model can always load factorized checkpoints (also back from ddp_spawn)."""

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        enable_factorized_loading(self.model)


def run(args: Optional[list[str]] = None) -> FactorizeCLI:
    """Runs the CLI on ``args`` (default: the command line) and returns the CLI object."""
    # ``python -m`` puts the current directory on sys.path, a console script does not: do it here
    # so that ``class_path: my_module.MyModel`` resolves the same way in both.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return FactorizeCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(args: Optional[list[str]] = None) -> None:
    """The console script's entry point: exits 0 after a successful run."""
    run(args)
