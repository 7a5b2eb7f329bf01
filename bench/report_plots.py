"""Figures of the comparison report, written as PNG files.

Figures are ``matplotlib.figure.Figure`` objects saved directly (the Agg renderer), without
pyplot's global state, so no display is needed.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pandas as pd
import scikit_posthocs
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 110
TASK_COLORS = matplotlib.colormaps["tab20"]


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def cd_diagram(
    average_ranks: pd.Series, pvalues: pd.DataFrame, critical_difference: float, alpha: float, title: str, path: Path
) -> Path:
    """Critical difference diagram (Demsar 2006, Fig. 1): average ranks on an axis, the CD as a bar.

    Methods joined by a thick line are not significantly different by the Nemenyi test at
    ``alpha`` (scikit-posthocs' ``critical_difference_diagram``); rank 1 is best.
    """
    height = 1.2 + 0.3 * len(average_ranks)
    figure = Figure(figsize=(7, height))
    axes = figure.subplots()
    scikit_posthocs.critical_difference_diagram(
        average_ranks,
        pvalues,
        alpha=alpha,
        ax=axes,
        label_fmt_left="{label} ({rank:.2f})",
        label_fmt_right="({rank:.2f}) {label}",
    )
    axes.set_xlim(1, max(len(average_ranks), 2))  # the whole rank scale, as in Demsar's figures
    # The CD as a bar from rank 1, above the rank axis and its tick labels.
    axes.plot([1, 1 + critical_difference], [1.6, 1.6], color="k", linewidth=2, clip_on=False)
    axes.text(1 + critical_difference / 2, 1.85, "CD", ha="center", va="bottom", fontsize=9)
    bottom, _ = axes.get_ylim()
    axes.set_ylim(bottom, 2.4)
    axes.set_title(
        f"{title}\nrank 1 = best; Nemenyi CD = {critical_difference:.3f} at alpha = {alpha}", fontsize=10, pad=6
    )
    return _save(figure, path)


def weight_trajectories(weights: pd.DataFrame, path: Path) -> Path:
    """One panel per method: each task's mean training weight per epoch (mean over seeds).

    ``weights`` has rows ``method, seed, task, epoch, value``.
    """
    methods = list(dict.fromkeys(weights["method"]))
    columns = min(3, len(methods))
    rows = -(-len(methods) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.0 * rows))
    axes = figure.subplots(rows, columns, squeeze=False, sharex=True)
    for panel, method in zip(axes.flat, methods):
        mean = weights[weights["method"] == method].pivot_table(index="epoch", columns="task", values="value")
        for i, task in enumerate(mean.columns):
            panel.plot(
                mean.index, mean[task], marker=".", linewidth=1, label=task, color=TASK_COLORS(i % TASK_COLORS.N)
            )
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        panel.set_title(method, fontsize=10)
        panel.set_xlabel("epoch")
        panel.set_ylabel("task weight")
    for panel in axes.flat[len(methods) :]:
        panel.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="task")
    figure.suptitle("Task weights over training (mean over seeds)", fontsize=11)
    figure.tight_layout()
    return _save(figure, path)


def validation_curves(curves: pd.DataFrame, metric: str, path: Path) -> Path:
    """Validation ``metric`` per epoch: one line per method (mean over seeds), shaded min to max.

    ``curves`` has rows ``method, seed, epoch, value``.
    """
    figure = Figure(figsize=(6.5, 3.8))
    axes = figure.subplots()
    for method, rows in curves.groupby("method", sort=False):
        by_epoch = rows.groupby("epoch")["value"]
        mean = by_epoch.mean()
        axes.plot(mean.index, mean.to_numpy(), marker="o", linewidth=1.5, label=str(method))
        axes.fill_between(mean.index, by_epoch.min().to_numpy(), by_epoch.max().to_numpy(), alpha=0.15)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel(f"validation {metric}")
    axes.set_title(f"Validation {metric} (mean over seeds; band: min to max)", fontsize=10)
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(figure, path)


def cost_bars(ms_per_phase: pd.DataFrame, path: Path) -> Path:
    """Stacked horizontal bars of milliseconds per training step by phase, one bar per method.

    ``ms_per_phase`` has one row per method and one column per phase.
    """
    figure = Figure(figsize=(7, 1.0 + 0.45 * len(ms_per_phase)))
    axes = figure.subplots()
    left = pd.Series(0.0, index=ms_per_phase.index)
    for phase in ms_per_phase.columns:
        widths = ms_per_phase[phase].fillna(0.0)
        axes.barh(ms_per_phase.index, widths, left=left, label=phase)
        left = left + widths
    axes.invert_yaxis()
    axes.set_xlabel("ms per training step (mean over seeds)")
    axes.set_title("Cost per training step by phase", fontsize=10)
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(figure, path)
