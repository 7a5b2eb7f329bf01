"""Validation of task-suite options, with errors that name the option and its valid range."""

from __future__ import annotations

import numbers
from typing import Any


def check_integer(option: str, value: Any, low: int, high: int) -> int:
    """``value`` as an int if it is an integer in ``[low, high]``; else a ``ValueError`` naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise ValueError(f"{option} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def check_real(option: str, value: Any, low: float, high: float) -> float:
    """``value`` as a float if ``low < value < high`` (open interval); else a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low < value < high:
        raise ValueError(f"{option} must be a number in the open interval ({low}, {high}), got {value!r}")
    return float(value)


def check_choice(option: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``; else a ``ValueError`` listing them."""
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(choices)}; got {value!r}")
    return str(value)
