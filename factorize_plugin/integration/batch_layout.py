"""A check made when ``fit`` starts, before any training batch, for a problem that would otherwise
surface only at the first milestone, after an epoch of training.

``BatchLayoutCheck``: the callback calls the model itself on validation batches (the output
shift, ``output_batches``; a measuring ``ParamBudget``, ``budget_batches``) by the rule of
``surgery/calling.py``. Whether ``forward`` can take what that rule makes of a batch is read
from its signature against the batch (``calling.layout_problem``: no forward pass, nothing of the
run changes), on the first validation batch of the sanity check, or, without one, on the first
validation batch fetched before training (``engine.output_shift.first_batches``: the RNG left as it was).
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch import LightningModule, Trainer

from ..engine.output_shift import first_batches
from ..surgery.calling import BatchLayoutError, InputFn, layout_problem
from .lightning_host import LightningHost


class BatchLayoutCheck:
    """Once per ``fit``: whether the model can be called on a validation batch by the callback's
    rule (see the module docstring); a ``BatchLayoutError`` naming ``input_fn=`` otherwise."""

    def __init__(self) -> None:
        self.pending = False
        self.uses: str = ""  # what the callback calls the model for, in words

    def arm(self, output_batches: int, probing: bool, budget_batches: int) -> None:
        """Checks the next batch where the callback will call the model: for the output shift
        (``output_batches`` > 0) or a measuring ``ParamBudget`` (``probing``)."""
        uses = [f"the output shift at each milestone (output_batches={output_batches})"] if output_batches else []
        if probing:
            uses.append(f"a ParamBudget's output measurements (budget_batches={budget_batches})")
        self.pending, self.uses = bool(uses), " and ".join(uses)

    def see(self, pl_module: LightningModule, batch: Any, input_fn: Optional[InputFn]) -> None:
        """Checks ``batch`` (a validation batch of the first loader, on the device) if still pending."""
        if not self.pending:
            return
        self.pending = False
        problem = layout_problem(pl_module, batch, input_fn)
        if problem is not None:
            raise BatchLayoutError(
                f"LowRankFactorization calls the model on validation batches for {self.uses}, but {problem}. "
                "(Or set output_batches=0 and budget_batches=0: the callback then never calls the model itself.)"
            )

    def before_training(self, trainer: Trainer, pl_module: LightningModule, input_fn: Optional[InputFn]) -> None:
        """Without a sanity check that showed a validation batch: fetches the first one and checks it."""
        if self.pending:
            batches = first_batches(LightningHost(trainer, pl_module), 1)
            self.pending = bool(batches)  # no validation batch at all: nothing to check
            if batches:
                self.see(pl_module, batches[0], input_fn)


__all__ = ["BatchLayoutCheck"]
