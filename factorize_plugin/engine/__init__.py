"""The plain-PyTorch engine between model surgery and the training loop: *when* to factorize.

``FactorizationEngine`` owns the schedule, the statistics of the evaluation before a milestone, the
milestone itself, the learning-rate re-warm, the speed decision and their checkpointed state; it
reaches the loop only through a ``Host`` (``PlainHost`` for a hand-written loop). The Lightning
callback drives it from its hooks. No Lightning import here.
"""

from .engine import FactorizationEngine
from .host import Host, PlainHost

__all__ = ["FactorizationEngine", "Host", "PlainHost"]
