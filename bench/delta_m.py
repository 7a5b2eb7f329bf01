"""Delta_m%: a method's mean relative improvement over a baseline, in percent.

With ``M_m`` a metric of the method, ``B_m`` the same metric of the baseline (both averaged
over seeds) and ``s_m = +1`` when higher is better, ``-1`` when lower is better, the
relative improvement of one metric is ``s_m (M_m - B_m) / B_m``. Two conventions average it:

- ``per-task`` (LibMTL, Lin & Zhang 2023, ``count_improvement``): average within each task over
  its metrics, then over tasks:
  ``Delta_m = 100 / T * sum_t 1 / |M_t| * sum_{m in M_t} s_m (M_m - B_m) / B_m``.
- ``flat`` (Nash-MTL, Navon et al. 2022; FAMO): average over all ``K`` metrics at once:
  ``Delta_m = 100 / K * sum_k s_k (M_k - B_k) / B_k``.

Here both are signed so that a positive Delta_m means better than the baseline (LibMTL's
sign). Nash-MTL and FAMO print the opposite sign (a performance drop, lower is better).
When every task has exactly one metric the two conventions agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

CONVENTIONS: dict[str, str] = {
    "per-task": "mean over tasks of the mean over each task's metrics (LibMTL)",
    "flat": "mean over all metrics (Nash-MTL, FAMO)",
}


class UndefinedImprovementError(ValueError):
    """The baseline scores 0 on a metric, so a relative improvement over it is undefined."""


def relative_improvement(means: pd.DataFrame, baseline: str, directions: Mapping[str, str]) -> pd.DataFrame:
    """``s_m (M_m - B_m) / B_m`` for every method (rows) and metric (columns of ``means``).

    ``means`` holds one row per method and one column per metric key; ``directions`` maps
    each key to ``"maximize"`` or ``"minimize"``. A baseline that scores 0 on a metric raises
    :class:`UndefinedImprovementError`.
    """
    if baseline not in means.index:
        raise ValueError(f"baseline {baseline!r} is not among the methods {list(means.index)}")
    missing = [key for key in means.columns if key not in directions]
    if missing:
        raise ValueError(f"no direction (maximize or minimize) known for metric(s) {missing}")
    sign = np.array([1.0 if directions[key] == "maximize" else -1.0 for key in means.columns])
    base = means.loc[baseline]
    if (base == 0).any():
        zero = list(base.index[base == 0])
        raise UndefinedImprovementError(
            f"the baseline {baseline!r} scores 0 on {zero}: a relative improvement is undefined"
        )
    return (means - base) / base * sign


def delta_m(
    means: pd.DataFrame,
    baseline: str,
    directions: Mapping[str, str],
    task_metrics: Mapping[str, Sequence[str]],
    convention: str,
) -> pd.Series:
    """Delta_m% of every method against ``baseline`` under ``convention`` (see the module doc).

    Args:
        means: one row per method, one column per metric key, each value averaged over seeds.
        baseline: the row compared against (EW, or single-task learning).
        directions: metric key -> ``"maximize"`` or ``"minimize"``.
        task_metrics: task -> its metric keys (``TaskSuite.task_metrics()``); only these keys
            enter Delta_m.
        convention: ``"per-task"`` or ``"flat"``.

    A method missing any of the keys gets NaN.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown Delta_m convention {convention!r}; choose one of {list(CONVENTIONS)}")
    keys = [key for task_keys in task_metrics.values() for key in task_keys]
    absent = [key for key in keys if key not in means.columns]
    if absent:
        raise ValueError(f"Delta_m needs metric(s) {absent}, which the results do not hold")
    improvement = relative_improvement(means[keys], baseline, directions)
    if convention == "flat":
        per_method = improvement.mean(axis=1, skipna=False)
    else:
        per_task = pd.concat(
            {task: improvement[list(task_keys)].mean(axis=1, skipna=False) for task, task_keys in task_metrics.items()},
            axis=1,
        )
        per_method = per_task.mean(axis=1, skipna=False)
    return 100.0 * per_method
