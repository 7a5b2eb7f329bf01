"""Delta_m% under both conventions, against LibMTL's own ``count_improvement`` and by hand."""

from __future__ import annotations

import pandas as pd
import pytest

from bench.delta_m import delta_m
from methods.libmtl import import_libmtl_weighting

# Two tasks: segmentation (mIoU and pixel accuracy, higher is better) and depth (abs. error, lower).
DIRECTIONS = {"miou": "maximize", "pix_acc": "maximize", "abs_err": "minimize"}
TASKS = {"segmentation": ("miou", "pix_acc"), "depth": ("abs_err",)}
MEANS = pd.DataFrame(
    {"miou": [0.50, 0.55, 0.45], "pix_acc": [0.80, 0.76, 0.80], "abs_err": [0.40, 0.30, 0.50]},
    index=["ew", "a", "b"],
)


def test_per_task_and_flat_by_hand() -> None:
    # method a: miou +10 %, pix_acc -5 %, abs_err 0.40 -> 0.30 is +25 % (lower is better)
    per_task = delta_m(MEANS, "ew", DIRECTIONS, TASKS, "per-task")
    flat = delta_m(MEANS, "ew", DIRECTIONS, TASKS, "flat")
    assert per_task["a"] == pytest.approx(((10 - 5) / 2 + 25) / 2)
    assert flat["a"] == pytest.approx((10 - 5 + 25) / 3)
    assert per_task["ew"] == 0.0 and flat["ew"] == 0.0
    assert per_task["b"] == pytest.approx(((-10 + 0) / 2 - 25) / 2)


def test_per_task_equals_libmtl_count_improvement() -> None:
    import_libmtl_weighting()  # makes LibMTL 1.1.5 importable on current torchvision
    from LibMTL.utils import count_improvement

    higher_is_better = {task: [int(DIRECTIONS[k] == "maximize") for k in keys] for task, keys in TASKS.items()}
    base = {task: [MEANS.loc["ew", k] for k in keys] for task, keys in TASKS.items()}
    for method in ("a", "b"):
        new = {task: [MEANS.loc[method, k] for k in keys] for task, keys in TASKS.items()}
        expected = 100 * count_improvement(base, new, higher_is_better)
        assert delta_m(MEANS, "ew", DIRECTIONS, TASKS, "per-task")[method] == pytest.approx(expected)


def test_only_task_metrics_enter_and_missing_values_give_nan() -> None:
    with_mean = MEANS.assign(mean_score=[1.0, 9.0, 9.0])
    assert delta_m(with_mean, "ew", DIRECTIONS, TASKS, "flat")["a"] == pytest.approx(10.0)
    gap = MEANS.copy()
    gap.loc["b", "miou"] = float("nan")
    assert pd.isna(delta_m(gap, "ew", DIRECTIONS, TASKS, "per-task")["b"])


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="baseline 'stl'"):
        delta_m(MEANS, "stl", DIRECTIONS, TASKS, "flat")
    with pytest.raises(ValueError, match="unknown Delta_m convention"):
        delta_m(MEANS, "ew", DIRECTIONS, TASKS, "mean")
    with pytest.raises(ValueError, match="scores 0"):
        delta_m(MEANS.assign(abs_err=[0.0, 0.1, 0.1]), "ew", DIRECTIONS, TASKS, "flat")
    with pytest.raises(ValueError, match="normal_angle"):
        delta_m(MEANS, "ew", DIRECTIONS, {**TASKS, "normals": ("normal_angle",)}, "flat")
