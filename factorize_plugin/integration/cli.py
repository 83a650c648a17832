"""``python -m factorize_plugin`` / ``factorize-plugin``: LightningCLI in subclass mode.

Any LightningModule / LightningDataModule is given by ``class_path``; ``LowRankFactorization``
goes under ``trainer.callbacks``. Example: ``factorize-plugin fit --config examples/mnist.yaml``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI
from typing_extensions import override

from ..surgery.swap.checkpoint import enable_factorized_loading


class FactorizeCLI(LightningCLI):
    """LightningCLI whose model can always load factorized checkpoints (also back from ddp_spawn)."""

    @override
    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        enable_factorized_loading(self.model)


class _HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's formatter, keeping the description's line breaks (its example lines)."""

    @override
    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return argparse.RawDescriptionHelpFormatter._fill_text(self, text, width, indent)


DESCRIPTION = """\
factorize-plugin: train any LightningModule with LowRankFactorization, which replaces large
nn.Linear / nn.Conv2d layers by low-rank pairs at the epochs of a schedule (fitted exactly to the
inputs each layer saw on the validation data). It is LightningCLI in subclass mode: the model and
the data are given by class_path, the callback under trainer.callbacks.

example:
  factorize-plugin fit --config examples/mnist.yaml
  factorize-plugin fit --config examples/mnist.yaml --trainer.max_epochs 4
  factorize-plugin validate --config examples/mnist.yaml --ckpt_path path/to/last.ckpt
  factorize-plugin fit --trainer.callbacks.help factorize_plugin.LowRankFactorization

A class_path may name a module in the current directory (my_module.MyModel), as with python -m.
"""


def run(args: Optional[list[str]] = None) -> FactorizeCLI:
    """Runs the CLI on ``args`` (default: the command line) and returns the CLI object."""
    # ``python -m`` puts the current directory on sys.path, a console script does not: do it here
    # so that ``class_path: my_module.MyModel`` resolves the same way in both.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return FactorizeCLI(
        LightningModule,
        None,  # any LightningDataModule by class_path, or none: a model with its own dataloaders
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION, "formatter_class": _HelpFormatter},
        args=args,
    )


def main(args: Optional[list[str]] = None) -> None:
    """The console script's entry point: exits 0 after a successful run (returns None, so that the
    console-script wrapper's ``sys.exit(main())`` neither prints an object nor exits 1)."""
    run(args)
