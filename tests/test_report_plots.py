"""The report's task-weight figure stays readable with the 14 findings of the chest X-ray suites."""

from __future__ import annotations

import colorsys
import io
import itertools
from pathlib import Path

import matplotlib.colors
import matplotlib.image
import pandas as pd
import pytest

from bench import report_plots
from bench.report_render import PAGE_WIDTH_EM

FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip
METHODS = ("ew", "deepchest", "uwso", "mgda")
BROWSER_PX_PER_EM = 16


@pytest.fixture(scope="module")
def weights() -> pd.DataFrame:
    """EW's weights are 1; DeepChest moves them by about 1 %; UW-SO's and MGDA's sum to 1 and spread."""
    rows = []
    for method in METHODS:
        for seed in (0, 1):
            for epoch in range(1, 6):
                for i, task in enumerate(FINDINGS):
                    value = {
                        "ew": 1.0,
                        "deepchest": 1.0 + 0.002 * epoch * (i % 3 - 1),
                        "uwso": (1.0 + 0.05 * epoch * (i % 4 - 1.5)) / len(FINDINGS),
                        "mgda": (1.0 + 0.1 * (i % 5 - 2)) / len(FINDINGS),
                    }[method]
                    rows.append((method, seed, task, epoch, value))
    return pd.DataFrame(rows, columns=["method", "seed", "task", "epoch", "value"])


def test_every_task_looks_different(weights: pd.DataFrame) -> None:
    """Two tasks of the same hue (tab20 pairs a dark and a light one) differ in line style or marker."""
    panel = report_plots.weights_figure(weights).axes[0]
    lines = [line for line in panel.get_lines() if line.get_label() in FINDINGS]
    assert len(lines) == len(FINDINGS)
    for first, second in itertools.combinations(lines, 2):
        hues = [colorsys.rgb_to_hsv(*matplotlib.colors.to_rgb(line.get_color()))[0] for line in (first, second)]
        if abs(hues[0] - hues[1]) < 0.03:
            assert (first.get_linestyle(), first.get_marker()) != (second.get_linestyle(), second.get_marker())


def test_panels_share_a_y_axis_from_zero_and_label_their_epochs(weights: pd.DataFrame) -> None:
    figure = report_plots.weights_figure(weights)
    figure.savefig(io.BytesIO(), format="png")  # lays the figure out
    panels = [panel for panel in figure.axes if panel.get_visible()]
    assert len(panels) == len(METHODS)
    assert {panel.get_ylim() for panel in panels} == {panels[0].get_ylim()} and panels[0].get_ylim()[0] == 0.0
    for panel in panels:  # the top row too
        assert panel.get_xlabel() == "epoch"
        assert any(label.get_visible() and label.get_text() for label in panel.get_xticklabels())


def test_legend_is_legible_on_the_html_page(weights: pd.DataFrame, tmp_path: Path) -> None:
    """The legend's text is at least 11 px high once the PNG is scaled to the page's width."""
    path = report_plots.weight_trajectories(weights, tmp_path / "weights.png")
    width_px = matplotlib.image.imread(path).shape[1]
    scale = min(1.0, PAGE_WIDTH_EM * BROWSER_PX_PER_EM / width_px)
    (legend,) = report_plots.weights_figure(weights).legends
    for text in legend.get_texts():
        assert text.get_fontsize() * report_plots.DPI / 72 * scale >= 11, text.get_text()
