"""``python -m factorize_plugin`` / ``factorize-plugin``: LightningCLI in subclass mode.

Any LightningModule / LightningDataModule is given by ``class_path``; ``LowRankFactorization``
goes under ``trainer.callbacks``. Example: ``factorize-plugin fit --config examples/mnist.yaml``.
"""

from __future__ import annotations

from typing import Optional

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from .checkpoint import enable_factorized_loading


class FactorizeCLI(LightningCLI):
    """LightningCLI whose model can always load factorized checkpoints (also back from ddp_spawn)."""

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        enable_factorized_loading(self.model)


def main(args: Optional[list[str]] = None) -> FactorizeCLI:
    return FactorizeCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
