"""The optimizer-state rules at a swap that the recovery benchmarks measured before the library's
own (``factorize_plugin/surgery/swap/carry.py``: Adam's or SGD's state carried onto every new
pair, from the dense layer or the pair it replaces; with ``rewarm_steps="auto"``, a learning-rate
ramp only after a swap that left some moments empty), kept so that their older cells stay
reproducible. Each patches the library's carry, or its re-warm decision, for the length of a
milestone."""

from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl

from factorize_plugin import LowRankFactorization
from factorize_plugin.engine import engine
from factorize_plugin.surgery.swap import optim

CARRY = optim.carried_pair_state


class _Patched(LowRankFactorization):
    """Runs each milestone with ``optim.carried_pair_state`` replaced by ``carry`` and, if
    ``always_ramp``, the re-warm due after every swap (the rule before: fresh moments everywhere)."""

    carry: Callable[..., dict] = staticmethod(CARRY)
    always_ramp = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        rule = engine.left_without_state
        optim.carried_pair_state = self.carry  # type: ignore[assignment]
        if self.always_ramp:
            engine.left_without_state = lambda optimizers, modules: True  # type: ignore[assignment]
        try:
            super().on_train_batch_start(trainer, pl_module, batch, idx)
        finally:
            optim.carried_pair_state, engine.left_without_state = CARRY, rule  # type: ignore[assignment]


class FreshState(_Patched):
    """Every new pair starts with empty optimizer state, and the rate re-warms after each swap
    (what every progressive method without ``carr`` in its name measured)."""

    carry = staticmethod(lambda old, new, state: {})
    always_ramp = True


class PairCarry(_Patched):
    """Only a refactorized pair's state is carried (a dense layer's new pair starts empty): the
    lever as first measured (``callback_progressive_carry_no_rewarm``, ``..._carry_kd_no_rewarm``)."""

    carry = staticmethod(lambda old, new, state: CARRY(old, new, state) if "first.weight" in old else {})


class PairCarryRewarm(PairCarry):
    """``PairCarry`` with the re-warm after every swap (``callback_progressive_carry``)."""

    always_ramp = True
