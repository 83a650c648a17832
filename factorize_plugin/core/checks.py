"""Argument checks shared by every floor: what counts as a number.

NumPy scalars of every width (``np.float32(0.1)``, ``np.int64(3)``) Python numbers are
taken wherever a Python float or int is; ``bool`` is not a number here (``True`` as a rank or a
margin is a mistake, not a 1).
"""

from __future__ import annotations

import numbers
from typing import Any


def is_real(value: Any) -> bool:
    """A real number (Python or NumPy, any width), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    """An integer (Python or NumPy, any width), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
