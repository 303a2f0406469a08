"""The tests of a setting's value that every part of the package shares: one definition of "a count",
"a finite number >= 0", "an on/off flag" and the like, so that ``True`` is never taken for 1 anywhere.

Each returns a bool; the caller raises the error that names the setting and what it expects.  This
module imports nothing of the package, so the data, rewards, networks and env can all use it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def is_integer(value: Any) -> bool:
    """Whether ``value`` is a Python or numpy integer, not a bool (``True`` is not a setting's number)."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer))


def is_count(value: Any) -> bool:
    """Whether ``value`` is a whole number >= 1: a Python or numpy integer, not a bool (``True`` is not a count)."""
    return is_integer(value) and value >= 1


def is_positive_number(value: Any) -> bool:
    """Whether ``value`` is a finite number > 0: a Python or numpy number, not a bool."""
    return is_number(value) and bool(math.isfinite(value) and value > 0)


def is_non_negative_number(value: Any) -> bool:
    """Whether ``value`` is a finite number >= 0: a Python or numpy number, not a bool."""
    return is_number(value) and bool(math.isfinite(value) and value >= 0)


def is_number(value: Any) -> bool:
    """Whether ``value`` is a Python or numpy real number, not a bool (``True`` is not a setting's number)."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating))


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite Python or numpy real number, not a bool."""
    return is_number(value) and bool(math.isfinite(value))


def is_open_probability(value: Any) -> bool:
    """Whether ``value`` is a number strictly between 0 and 1 (a rate that neither selects nothing nor everything)."""
    return is_number(value) and 0 < value < 1


def is_whole_number(value: Any) -> bool:
    """Whether ``value`` is a whole number >= 0: a Python or numpy integer, not a bool."""
    return is_integer(value) and value >= 0


def is_flag(value: Any) -> bool:
    """Whether ``value`` is a bool (Python or numpy): an on/off setting, where ``"no"`` or ``0`` would be misread."""
    return isinstance(value, (bool, np.bool_))
