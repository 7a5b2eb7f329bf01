"""Figures of the comparison report, written as PNG files.

Figures are ``matplotlib.figure.Figure`` objects saved directly (the Agg renderer), without
pyplot's global state, so no display is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd
import scikit_posthocs
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 110
TASK_COLORS = matplotlib.colormaps["tab10"]
LINE_STYLES = ("-", "--", "-.")
TASK_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h", "<", ">", "p", "d", "8", "H", "1", "2", "3", "4", "+")
LEGEND_COLUMNS = 5
LEGEND_FONT_SIZE = 10
"""Points; at :data:`DPI` and the width the figures are drawn at, about 15 pixels on the HTML page."""


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


def task_styles(n_tasks: int) -> list[dict[str, Any]]:
    """A distinct look per task: ten qualitative colours, then the same colours dashed, each task its own marker."""
    return [
        {
            "color": TASK_COLORS(i % TASK_COLORS.N),
            "linestyle": LINE_STYLES[i // TASK_COLORS.N % len(LINE_STYLES)],
            "marker": TASK_MARKERS[i % len(TASK_MARKERS)],
        }
        for i in range(n_tasks)
    ]


def weights_figure(weights: pd.DataFrame) -> Figure:
    """One panel per method: each task's share of the summed training weight per epoch (mean over seeds).

    ``weights`` has rows ``method, seed, task, epoch, value``. Shares (``w_t / sum_s w_s``)
    put methods that scale their weights differently (summing to 1, to ``T``, or free) on one
    y axis, shared by every panel and starting at 0, with the equal share ``1 / T`` dotted:
    a change of 1 % looks like one. Every panel labels its epochs; the legend sits below.
    """
    methods = list(dict.fromkeys(weights["method"]))
    tasks = list(dict.fromkeys(weights["task"]))
    totals = weights.groupby(["method", "seed", "epoch"])["value"].transform("sum")
    shares = weights.assign(share=weights["value"] / totals)
    columns = min(3, len(methods))
    rows = -(-len(methods) // columns)
    legend_rows = -(-len(tasks) // LEGEND_COLUMNS)
    figure = Figure(figsize=(4.0 * columns, 3.0 * rows + 0.8 + 0.25 * legend_rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False, sharex=True, sharey=True)
    styles = dict(zip(tasks, task_styles(len(tasks))))
    means = {
        method: shares[shares["method"] == method].pivot_table(index="epoch", columns="task", values="share")
        for method in methods
    }
    for panel, (method, mean) in zip(axes.flat, means.items()):
        for task in mean.columns:
            panel.plot(mean.index, mean[task], linewidth=1.2, markersize=5, label=task, **styles[task])
        panel.axhline(1.0 / len(tasks), color="0.4", linestyle=":", linewidth=1)
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        panel.tick_params(labelbottom=True, labelleft=True, labelsize=9)
        panel.set_title(method, fontsize=11)
        panel.set_xlabel("epoch", fontsize=10)
        panel.set_ylabel("share of the summed weight", fontsize=10)
        panel.grid(alpha=0.3)
    top = max(*(float(mean.max().max()) for mean in means.values()), 1.0 / len(tasks))
    axes.flat[0].set_ylim(0.0, top * 1.1)
    for panel in axes.flat[len(methods) :]:
        panel.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(
        handles,
        labels,
        loc="outside lower center",
        ncols=min(LEGEND_COLUMNS, len(tasks)),
        fontsize=LEGEND_FONT_SIZE,
        title="task (dotted line: equal share 1/T)",
        title_fontsize=LEGEND_FONT_SIZE,
    )
    figure.suptitle(
        "Task weights over training: each task's share of the summed weight (mean over seeds)", fontsize=12
    )
    return figure


def weight_trajectories(weights: pd.DataFrame, path: Path) -> Path:
    """Write :func:`weights_figure` of ``weights`` to ``path``."""
    return _save(weights_figure(weights), path)


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
