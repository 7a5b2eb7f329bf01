"""Numbers as the run table and the report print them: a dash for a missing value, a spread
only where there is one."""

from __future__ import annotations

import math
from collections.abc import Iterable

MISSING = "–"


def number(value: float | None, digits: int) -> str:
    """``value`` with ``digits`` decimals; ``–`` for ``None`` or NaN."""
    return MISSING if value is None or math.isnan(value) else f"{value:.{digits}f}"


def mean_std(mean: float | None, std: float | None, digits: int) -> str:
    """``mean ± std``; the mean alone where there is no spread (``std`` ``None`` or NaN: fewer than two values)."""
    if std is None or math.isnan(std):
        return number(mean, digits)
    return f"{number(mean, digits)} ± {number(std, digits)}"


def count_range(counts: Iterable[float | None]) -> str:
    """``6`` when every count is 6, ``5–6`` when they range from 5 to 6; ``–`` for none."""
    present = sorted({int(c) for c in counts if c is not None and not math.isnan(c)})
    if not present:
        return MISSING
    return str(present[0]) if len(present) == 1 else f"{present[0]}–{present[-1]}"
