"""Assemble the comparison report from long-format results: tables, tests, figures, files.

Outputs in the report directory: ``report.md``, ``report.html`` (self-contained),
``stats.json``, ``tables/<name>.tex`` (booktabs) and ``figures/<name>.png``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench import report_plots
from bench.delta_m import CONVENTIONS, UndefinedImprovementError, delta_m
from bench.display import count_range, mean_std, number
from bench.report_render import Figure, Heading, Paragraph, Part, Table, to_html, to_markdown, write_latex_tables
from bench.results_io import MetricInfo, Results, load_histories, load_test_predictions, metric_info
from bench.stats import (
    PairedPredictions,
    block_matrix,
    comparable_metrics,
    compare,
    family_of,
    keys_of,
    paired_bootstrap_mean_auroc,
    task_of,
    wilcoxon_key,
)
from bench.timing import STEP_PHASES

SINGLE_TASK_METHOD = "stl"
"""Results of single-task learning carry this method name (e.g. in a CSV); Delta_m uses them as a baseline."""
EQUAL_WEIGHTING = "ew"
COST_PHASES = ("data", *STEP_PHASES)


@dataclass(frozen=True)
class ReportOptions:
    """What to compare and where to write.

    Attributes:
        out: the report directory.
        metric: the metric to compare by (a key such as ``mean_auroc`` or a family such as
            ``auroc``); ``None``: the primary metric's per-task family when there is one.
        reference: the method every other is tested against (also always against ``ew``);
            ``None``: ``ew`` when it ran, else the first method.
        alpha: significance level of the Nemenyi critical difference.
        bootstrap_resamples: resamples of the paired bootstrap; 0 skips it.
        minimize: metric keys or families that are better when lower (for data sets that
            are no task suite).
        command: the command line that made the report, quoted in it.
    """

    out: Path
    metric: str | None = None
    reference: str | None = None
    alpha: float = 0.05
    bootstrap_resamples: int = 1000
    minimize: tuple[str, ...] = ()
    command: str = "python -m bench report"


@dataclass
class Report:
    """What :func:`build_report` wrote and found."""

    directory: Path
    stats: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _pvalue(p: float) -> str:
    return "–" if math.isnan(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def _best_mask(values: pd.DataFrame, maximize: bool, axis: int) -> pd.DataFrame:
    """True where a value is the best along ``axis`` (1: of its row, 0: of its column), unless all there are equal."""
    oriented = values if maximize else -values
    marked = oriented.eq(oriented.max(axis=axis), axis=1 - axis)
    varied = oriented.nunique(axis=axis) > 1
    return marked.mul(varied, axis=1 - axis).astype(bool)


def _json_ready(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None``, so that ``stats.json`` is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _best_ranked(average_ranks: dict[str, float]) -> str:
    """The method(s) with the lowest mean rank, or ``–`` when all ranks are equal."""
    best = min(average_ranks.values())
    if max(average_ranks.values()) == best:
        return "–"
    return ", ".join(m for m, r in average_ranks.items() if r == best)


def _reference(requested: str | None, methods: Sequence[str]) -> tuple[str, str]:
    """The method every other is tested against, and why it is that one, in words."""
    if requested is not None:
        return requested, "chosen with --reference"
    if EQUAL_WEIGHTING in methods:
        return EQUAL_WEIGHTING, f"the default: {EQUAL_WEIGHTING} is among the methods; --reference chooses another"
    return methods[0], (
        f"the default: {EQUAL_WEIGHTING} is not among the methods, so the first one is; --reference chooses another"
    )


def choose_metric(keys: Sequence[str], requested: str | None, primary: dict[str, str]) -> str:
    """The metric to compare by: ``requested``, else the primary metric's per-task family.

    For a primary metric ``mean_<m>`` whose per-task keys ``<m>/<task>`` are present, the
    family ``<m>`` is chosen, so that blocks are tasks x seeds.
    """
    families = {family_of(k) for k in keys if "/" in k}
    candidates = comparable_metrics(keys)
    if requested is not None:
        if requested in candidates or requested in keys:
            return requested
        raise ValueError(f"--metric {requested!r} is not in the results; choose one of: {', '.join(candidates)}")
    for metric in primary.values():
        if metric.removeprefix("mean_") in families:
            return metric.removeprefix("mean_")
        if metric in candidates:
            return metric
    if len(candidates) == 1:
        return candidates[0]
    raise ValueError(
        f"the results hold several metrics; choose the one to compare by with --metric: {', '.join(candidates)}"
    )


def _direction(metric: str, keys: Sequence[str], info: MetricInfo) -> str:
    directions = {info.directions[k] for k in keys_of(metric, keys)}
    if len(directions) != 1:
        raise ValueError(f"the keys of {metric!r} mix higher-is-better and lower-is-better metrics")
    return directions.pop()


def _seed_summary(quality: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std over seeds of every (dataset, metric, method); the std is NaN for one seed."""
    return quality.groupby(["dataset", "metric", "method"])["value"].agg(["mean", "std"])


class _Builder:
    """Collects the report's parts, numbers and warnings while computing them."""

    def __init__(self, results: Results, options: ReportOptions, tracking_uri: str | None) -> None:
        self.results = results
        self.options = options
        self.tracking_uri = tracking_uri
        self.quality = results.quality()
        self.info = metric_info(results, options.minimize)
        self.keys = sorted(self.quality["metric"].unique())
        self.metric = choose_metric(self.keys, options.metric, self.info.primary)
        self.methods = list(dict.fromkeys(self.quality["method"]))
        self.datasets = list(dict.fromkeys(self.quality["dataset"]))
        self.reference, self.reference_reason = _reference(options.reference, self.methods)
        self.references = tuple(dict.fromkeys((self.reference, EQUAL_WEIGHTING)))
        self.summary = _seed_summary(self.quality)
        self.parts: list[Part] = []
        self.warnings: list[str] = [*results.warnings]
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.tabulated: set[str] = set()  # the metric keys whose means over seeds a table shows
        self.figures_dir = options.out / "figures"

    # ----- statistics -------------------------------------------------------------------
    def comparisons(self) -> dict[str, dict[str, Any]]:
        metrics = comparable_metrics(self.keys)
        if self.metric not in metrics:
            metrics.insert(0, self.metric)
        comparisons = {}
        for metric in metrics:
            blocks = block_matrix(self.quality, metric, _direction(metric, self.keys, self.info))
            if blocks.dropped:
                self.warnings.append(
                    f"{metric}: {len(blocks.dropped)} incomplete block(s) dropped (a method has no value there): "
                    + "; ".join(blocks.dropped[:8])
                    + (f"; and {len(blocks.dropped) - 8} more" if len(blocks.dropped) > 8 else "")
                )
            comparisons[metric] = compare(blocks, self.references, self.options.alpha)
        return comparisons

    def bootstrap(self) -> dict[str, Any]:
        """Paired bootstrap of the mean-AUROC difference to each reference, per data set."""
        if not self.results.runs or self.options.bootstrap_resamples <= 0 or self.tracking_uri is None:
            return {}
        predictions = load_test_predictions(self.tracking_uri, self.results.runs)
        by_cell = {
            (r.dataset, r.method, r.seed): predictions[r.run_id] for r in self.results.runs if r.run_id in predictions
        }
        out: dict[str, Any] = {}
        for dataset in self.datasets:
            for reference in self.references:
                for method in self.methods:
                    reversed_pair_done = reference in out.get(dataset, {}).get(method, {})
                    if method == reference or reversed_pair_done:
                        continue
                    pairs = self._prediction_pairs(by_cell, dataset, method, reference)
                    if pairs:
                        result = paired_bootstrap_mean_auroc(pairs, self.options.bootstrap_resamples)
                        out.setdefault(dataset, {}).setdefault(reference, {})[method] = result
        return out

    def _prediction_pairs(
        self, by_cell: dict[tuple[str, str, str], pd.DataFrame], dataset: str, method: str, reference: str
    ) -> list[PairedPredictions]:
        pairs = []
        seeds = sorted(
            {s for (d, m, s) in by_cell if d == dataset and m == method}
            & {s for (d, m, s) in by_cell if d == dataset and m == reference}
        )
        for seed in seeds:
            first, second = by_cell[(dataset, method, seed)], by_cell[(dataset, reference, seed)]
            if set(first["id"]) != set(second["id"]):
                self.warnings.append(
                    f"{dataset} seed {seed}: {method} and {reference} were tested on different items; "
                    "no paired bootstrap for them"
                )
                return []
            second = second.set_index("id").loc[first["id"]].reset_index()
            tasks = [c.removeprefix("prob/") for c in first.columns if c.startswith("prob/")]
            labels = first[[f"label/{t}" for t in tasks]].to_numpy()
            pairs.append(
                PairedPredictions(
                    labels=labels,
                    first=first[[f"prob/{t}" for t in tasks]].to_numpy(dtype=float),
                    second=second[[f"prob/{t}" for t in tasks]].to_numpy(dtype=float),
                )
            )
        return pairs

    def delta_m(self) -> pd.DataFrame:
        """Delta_m% of every method against each baseline present (EW, single-task), both conventions.

        A baseline that scores 0 on one of the metrics (an AUROC of 0 on a tiny test split, say)
        is left out with a warning: a relative improvement over 0 is undefined.
        """
        means = self.summary["mean"].unstack("method").T  # methods x (dataset, metric)
        means = means.reindex(index=self.methods)
        task_metrics = {
            (dataset, task): [(dataset, key) for key in keys]
            for dataset, groups in self.info.task_metrics.items()
            for task, keys in groups.items()
        }
        directions = {(d, k): self.info.directions[k] for d, k in means.columns}
        columns = {}
        for baseline in (EQUAL_WEIGHTING, SINGLE_TASK_METHOD):
            if baseline not in self.methods:
                continue
            try:
                for convention in CONVENTIONS:
                    columns[(baseline, convention)] = delta_m(means, baseline, directions, task_metrics, convention)
            except UndefinedImprovementError as error:
                self.warnings.append(f"Delta_m% vs {baseline} is left out: {error}")
        return pd.DataFrame(columns)

    # ----- tables -----------------------------------------------------------------------
    def add_table(self, table: Table, numbers: pd.DataFrame) -> None:
        self.parts.append(table)
        self.tables[table.name] = json.loads(numbers.to_json(orient="records"))

    def summary_table(self, ranks: dict[str, float], deltas: pd.DataFrame) -> None:
        shown = self.info.reported[self.datasets[0]] if len(self.datasets) == 1 else ()
        numbers = pd.DataFrame(index=self.methods)
        cells = pd.DataFrame({"method": self.methods}, index=self.methods)
        bold = pd.DataFrame(False, index=self.methods, columns=cells.columns)
        dataset = self.datasets[0]
        seeds = self.quality.groupby("method")["seed"].nunique()
        cells["seeds"] = [str(seeds.get(m, 0)) for m in self.methods]
        numbers["seeds"] = [int(seeds.get(m, 0)) for m in self.methods]
        self.tabulated.update(shown)
        for key in shown:
            per_method = self.summary.loc[(dataset, key)].reindex(self.methods)
            numbers[f"{key}_mean"], numbers[f"{key}_std"] = per_method["mean"], per_method["std"]
            cells[key] = [mean_std(r["mean"], r["std"], 4) for _, r in per_method.iterrows()]
            bold[key] = _best_mask(per_method[["mean"]], self.info.directions[key] == "maximize", axis=0)["mean"]
        if ranks:
            column = f"mean rank ({self.metric})"
            numbers["mean_rank"] = pd.Series(ranks)
            cells[column] = [number(ranks.get(m, math.nan), 2) for m in self.methods]
            bold[column] = _best_mask(numbers[["mean_rank"]], False, axis=0)["mean_rank"]
        for (baseline, convention), values in deltas.items():
            column = f"Δm% vs {baseline} ({convention})"
            numbers[f"delta_m_vs_{baseline}_{convention}"] = values
            cells[column] = [number(values.get(m, math.nan), 2) for m in self.methods]
        numbers.insert(0, "method", self.methods)
        caption = "Test metrics, mean ± std over seeds (sample std; the mean alone from one seed); best in bold"
        self.add_table(Table("summary", caption, cells.reset_index(drop=True), bold.reset_index(drop=True)), numbers)

    def per_block_table(self) -> None:
        """The compared metric per task (and data set), one column per method, best per row bold."""
        rows = self.summary.reset_index()
        rows = rows[rows["metric"].isin(keys_of(self.metric, self.keys))]
        has_tasks = bool((rows["metric"].map(task_of) != "").any())
        if not has_tasks and len(self.datasets) == 1:
            return
        rows = rows.assign(task=rows["metric"].map(task_of))
        self.tabulated.update(rows["metric"])
        label = (["dataset"] if len(self.datasets) > 1 else []) + (["task"] if has_tasks else [])
        means = rows.pivot_table(index=label, columns="method", values="mean").reindex(columns=self.methods)
        stds = rows.pivot_table(index=label, columns="method", values="std", dropna=False).reindex_like(means)
        cells = pd.DataFrame(index=means.index, columns=self.methods, dtype=object)
        for method in self.methods:
            cells[method] = [mean_std(m, s, 4) for m, s in zip(means[method], stds[method])]
        maximize = _direction(self.metric, self.keys, self.info) == "maximize"
        bold = _best_mask(means, maximize, axis=1)
        index_labels = [" / ".join(map(str, i)) if isinstance(i, tuple) else str(i) for i in means.index]
        name = " / ".join(label)
        shown = pd.concat([pd.Series(index_labels, index=means.index, name=name), cells], axis=1)
        bold.insert(0, name, False)
        numbers = means.reset_index().melt(id_vars=label, var_name="method", value_name="mean")
        numbers["std"] = stds.reset_index().melt(id_vars=label, var_name="method", value_name="std")["std"]
        caption = f"{self.metric} per {name}: mean ± std over seeds; best per row in bold"
        self.add_table(
            Table(
                f"per_{_slug(name)}_{_slug(self.metric)}",
                caption,
                shown.reset_index(drop=True),
                bold.reset_index(drop=True),
            ),
            numbers,
        )

    def wilcoxon_table(self, comparison: dict[str, Any], reference: str) -> None:
        tests = comparison.get(wilcoxon_key(reference, self.references[0]))
        if tests is None:
            return
        numbers = pd.DataFrame([{"method": m, **values} for m, values in tests.items()])
        cells = pd.DataFrame(
            {
                "method": list(tests),
                f"mean diff vs {reference}": [f"{t['mean_difference']:+.4f}" for t in tests.values()],
                "rank-biserial r": [
                    f"{t['rank_biserial']:+.2f}" if not math.isnan(t["rank_biserial"]) else "–" for t in tests.values()
                ],
                "wins / ties / losses": [f"{t['wins']} / {t['ties']} / {t['losses']}" for t in tests.values()],
                "W = min(R+, R-)": [f"{t['statistic']:.1f}" for t in tests.values()],
                "p": [_pvalue(t["pvalue"]) for t in tests.values()],
                "p (Holm)": [_pvalue(t["pvalue_holm"]) for t in tests.values()],
            }
        )
        bold = pd.DataFrame(False, index=cells.index, columns=cells.columns)
        bold["p (Holm)"] = [t["pvalue_holm"] < self.options.alpha for t in tests.values()]
        caption = (
            f"Wilcoxon signed-rank test of each method against {reference} over the {comparison['n_blocks']} blocks "
            f"({comparison['blocks']}), Holm-corrected; p (Holm) < {self.options.alpha} in bold"
        )
        self.add_table(Table(f"wilcoxon_vs_{_slug(reference)}", caption, cells, bold), numbers)

    def friedman_table(self, comparisons: dict[str, dict[str, Any]]) -> None:
        rows, numbers = [], []
        for metric, c in comparisons.items():
            if "friedman" not in c:
                continue
            all_tied = "tie_corrected_undefined" in c["friedman"]
            rows.append(
                {
                    "metric": metric,
                    "blocks": f"{c['n_blocks']} ({c['blocks']})",
                    "χ²_F": f"{c['friedman']['statistic']:.2f}",
                    "p": _pvalue(c["friedman"]["pvalue"]),
                    "F_F": number(c["iman_davenport"]["statistic"], 2),
                    "p (F_F)": _pvalue(c["iman_davenport"]["pvalue"]),
                    f"CD (α={self.options.alpha})": f"{c['nemenyi_cd']:.3f}",
                    "best mean rank": (
                        "none: every block ties" if all_tied else _best_ranked(c["average_ranks"])
                    ),
                }
            )
            numbers.append(
                {
                    "metric": metric,
                    "n_blocks": c["n_blocks"],
                    "friedman": c["friedman"]["statistic"],
                    "friedman_pvalue": c["friedman"]["pvalue"],
                    "iman_davenport": c["iman_davenport"]["statistic"],
                    "iman_davenport_pvalue": c["iman_davenport"]["pvalue"],
                    "nemenyi_cd": c["nemenyi_cd"],
                    "every_block_ties": all_tied,
                }
            )
        if rows:
            caption = "Friedman test (no tie correction) with the Iman-Davenport F and the Nemenyi critical difference, every metric"
            self.add_table(Table("friedman_all_metrics", caption, pd.DataFrame(rows)), pd.DataFrame(numbers))

    def bootstrap_table(self, bootstrap: dict[str, Any]) -> None:
        rows, numbers = [], []
        for dataset, by_reference in bootstrap.items():
            for reference, by_method in by_reference.items():
                for method, b in by_method.items():
                    rows.append(
                        {
                            "dataset": dataset,
                            "method": method,
                            "vs": reference,
                            "Δ mean AUROC": f"{b['difference']:+.4f}",
                            f"{int(b['confidence'] * 100)}% CI": f"[{b['ci_low']:+.4f}, {b['ci_high']:+.4f}]",
                            "items × seeds": f"{b['n_items']} × {b['n_seeds']}",
                        }
                    )
                    numbers.append({"dataset": dataset, "method": method, "reference": reference, **b})
        if rows:
            cells = pd.DataFrame(rows)
            bold = pd.DataFrame(False, index=cells.index, columns=cells.columns)
            ci = cells.columns[4]
            bold[ci] = [n["ci_low"] > 0 or n["ci_high"] < 0 for n in numbers]
            caption = (
                "Paired bootstrap of the test mean-AUROC difference (method minus reference; items resampled, "
                f"the same resample for both methods and every seed; {numbers[0]['n_resamples']} resamples, "
                "percentile interval); intervals that exclude 0 in bold"
            )
            self.add_table(Table("bootstrap_mean_auroc", caption, cells, bold), pd.DataFrame(numbers))

    def cost_frame(self) -> pd.DataFrame:
        """Every cost metric over seeds: columns (statistic, metric) with the statistics ``mean``,
        ``std`` (sample std, NaN for one seed), ``min``, ``max`` and ``count``; rows (dataset, method)."""
        cost = self.results.cost()
        if cost.empty:
            return pd.DataFrame()
        # groupby keeps the all-NaN std of one-seed results (pivot_table would drop that column)
        statistics = cost.groupby(["dataset", "method", "metric"])["value"].agg(["mean", "std", "min", "max", "count"])
        frame = statistics.unstack("metric")
        order = [(d, m) for d in self.datasets for m in self.methods if (d, m) in frame.index]
        return frame.reindex(order)

    def cost_table(self, cost: pd.DataFrame) -> None:
        means, stds = cost["mean"], cost["std"]
        numbers = pd.DataFrame(index=cost.index)
        cells = pd.DataFrame(index=cost.index)
        if len(self.datasets) > 1:
            cells["dataset"] = [d for d, _ in cost.index]
        cells["method"] = [m for _, m in cost.index]
        cells["seeds"] = [str(int(c)) for c in cost["count"].max(axis=1)]

        def add(column: str, label: str, digits: int) -> None:
            numbers[column], numbers[f"{column}_std"] = means[column], stds[column]
            cells[label] = [mean_std(m, s, digits) for m, s in zip(means[column], stds[column])]

        for phase in COST_PHASES:
            if f"{phase}_ms" in means:
                add(f"{phase}_ms", f"{phase} ms", 1)
        if "step_ms" in means:
            add("step_ms", "ms/step", 1)
            ew = {d: means.loc[(d, EQUAL_WEIGHTING), "step_ms"] for d, m in cost.index if m == EQUAL_WEIGHTING}
            ratio = [means.loc[(d, m), "step_ms"] / ew[d] if d in ew else math.nan for d, m in cost.index]
            numbers["ratio_to_ew"] = ratio
            cells["× EW"] = [number(v, 2) for v in ratio]
        for column, label, digits in (("peak_memory_mb", "peak MB", 0), ("train_seconds", "train s", 1)):
            if column in means:
                add(column, label, digits)
        if "timed_steps" in means:
            lowest, highest = cost["min"]["timed_steps"], cost["max"]["timed_steps"]
            numbers["timed_steps_min"], numbers["timed_steps_max"] = lowest, highest
            cells["timed steps/run"] = [count_range((lo, hi)) for lo, hi in zip(lowest, highest)]
        numbers = numbers.reset_index()
        caption = (
            "Cost per training step by phase (data loading apart; ms/step sums the others), ratio of ms/step to EW, "
            "peak memory and training time: mean ± std over seeds (the mean alone from one seed); the training "
            "steps each run timed"
        )
        self.add_table(Table("cost", caption, cells.reset_index(drop=True)), numbers)

    # ----- figures ----------------------------------------------------------------------
    def figure(self, path: Path, caption: str) -> None:
        self.parts.append(Figure(str(path.relative_to(self.options.out)), caption))

    def training_figures(self) -> None:
        if not self.results.runs or self.tracking_uri is None:
            return
        primaries = sorted({r.primary_metric for r in self.results.runs if r.primary_metric})
        histories = load_histories(
            self.tracking_uri, self.results.runs, ("train/weight/", *(f"val/{p}" for p in primaries))
        )
        if histories.empty:
            return
        # MLflow steps are the epochs, counted from 1; runs logged before that counted from 0.
        counted_from_0 = histories.groupby(["dataset", "method", "seed"])["step"].transform("min").eq(0)
        histories = histories.assign(epoch=histories["step"] + counted_from_0.astype(int))
        for dataset, rows in histories.groupby("dataset", sort=False):
            suffix = f"-{_slug(str(dataset))}" if len(self.datasets) > 1 else ""
            weights = rows[rows["key"].str.startswith("train/weight/")]
            if not weights.empty:
                weights = weights.assign(task=weights["key"].str.removeprefix("train/weight/"))
                path = report_plots.weight_trajectories(weights, self.figures_dir / f"weights{suffix}.png")
                caption = f"Each task's share of the summed training weight per epoch (mean over seeds), {dataset}"
                self.figure(path, caption)
            for primary in primaries:
                curves = rows[rows["key"] == f"val/{primary}"]
                if not curves.empty:
                    path = report_plots.validation_curves(curves, primary, self.figures_dir / f"validation{suffix}.png")
                    self.figure(path, f"Validation {primary} per epoch, {dataset}")


def _overview(builder: _Builder, comparisons: dict[str, dict[str, Any]]) -> list[str]:
    results = builder.results
    seeds = builder.quality.groupby(["dataset", "method"])["seed"].nunique()
    runs = f"{len(results.runs)} finished runs" if results.runs else f"{len(seeds)} (data set, method) cells"
    lines = [
        f"Source: {results.source}; {runs}; data set(s): {', '.join(builder.datasets)}; "
        f"methods: {', '.join(builder.methods)}; seeds per method: "
        + ", ".join(f"{m} {int(seeds.xs(m, level='method').max())}" for m in builder.methods)
        + ".",
        f"Made by `{builder.options.command}`.",
    ]
    headline = comparisons[builder.metric]
    lines.append(
        f"Methods are compared by `{builder.metric}` ({headline['direction']}; blocks: {headline['blocks']}, "
        f"{headline['n_blocks']} complete). Ranks: 1 = best. Reference method of the tests: "
        f"`{builder.reference}` ({builder.reference_reason})."
    )
    return lines


def _delta_m_text(info: MetricInfo, deltas: pd.DataFrame, tabulated: set[str]) -> str:
    """The definition of the Delta_m% columns: conventions, sign, baselines, metrics per task, and
    whether the ``tabulated`` metric keys cover the values Delta_m averages."""
    baselines = list(dict.fromkeys(baseline for baseline, _ in deltas.columns))
    one_metric_per_task = all(len(keys) == 1 for groups in info.task_metrics.values() for keys in groups.values())
    averaged = sorted({k for groups in info.task_metrics.values() for keys in groups.values() for k in keys})
    untabulated = [k for k in averaged if k not in tabulated]
    metrics = "; ".join(
        f"{dataset}: {', '.join(sorted({k for keys in groups.values() for k in keys}))}"
        for dataset, groups in info.task_metrics.items()
    )
    return (
        "Delta_m% = mean relative improvement over the baseline, each metric signed by its direction "
        "(positive = better; Nash-MTL and FAMO print the opposite sign). "
        + "; ".join(f"`{name}`: {text}" for name, text in CONVENTIONS.items())
        + (". Every task here has one metric, so the two conventions agree" if one_metric_per_task else "")
        + f". Baselines: {', '.join(f'`{b}`' for b in baselines)}"
        + (
            ""
            if SINGLE_TASK_METHOD in baselines
            else f" (single-task results would be the method `{SINGLE_TASK_METHOD}`)"
        )
        + f". Metrics per task: {metrics}. The Delta_m% values are in the summary table"
        + (
            ", the metrics they average in the tables above."
            if not untabulated
            else f"; {len(untabulated)} of the {len(averaged)} metrics they average are in no table here "
            f"({', '.join(untabulated[:6])}{', ...' if len(untabulated) > 6 else ''}); the long-format results "
            "hold them (`--export-csv` writes them from MLflow)."
        )
    )


def _tests_text(comparison: dict[str, Any], alpha: float) -> list[str]:
    lines = []
    if "friedman" in comparison:
        f, i = comparison["friedman"], comparison["iman_davenport"]
        tie_corrected = f.get("tie_corrected_undefined") or (
            f"{number(f['tie_corrected_statistic'], 3)}, p = {_pvalue(f['tie_corrected_pvalue'])}"
        )
        lines.append(
            f"Friedman (Demsar 2006, no tie correction): χ²_F = {f['statistic']:.3f}, df = {f['df']}, "
            f"p = {_pvalue(f['pvalue'])} (tie-corrected, SciPy: {tie_corrected}). "
            f"Iman-Davenport: F_F = {number(i['statistic'], 3)}, "
            f"df = ({i['df1']}, {i['df2']}), p = {_pvalue(i['pvalue'])}. Nemenyi critical difference at α = {alpha}: "
            f"CD = {comparison['nemenyi_cd']:.3f}; methods whose mean ranks differ by less are not significantly different."
        )
    lines.extend(comparison["notes"])
    return lines


def build_report(results: Results, options: ReportOptions, tracking_uri: str | None = None) -> Report:
    """Compute every table, test and figure of the report and write its files to ``options.out``."""
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    builder = _Builder(results, options, tracking_uri)
    comparisons = builder.comparisons()
    headline = comparisons[builder.metric]
    deltas = builder.delta_m()
    builder.warnings.extend(builder.info.notes)

    parts = builder.parts
    parts.extend(Paragraph(line) for line in _overview(builder, comparisons))
    parts.append(Heading("Summary"))
    builder.summary_table(headline["average_ranks"], deltas)
    if len(builder.methods) == 1:
        parts.append(
            Paragraph(
                f"Only one method ({builder.methods[0]}) is in the results: tables are shown, but a significance "
                "test needs at least two methods to compare, so none is run."
            )
        )
    builder.per_block_table()

    parts.append(Heading(f"Significance: {builder.metric}"))
    parts.extend(Paragraph(line) for line in _tests_text(headline, options.alpha))
    if "nemenyi_pvalues" in headline:
        path = report_plots.cd_diagram(
            pd.Series(headline["average_ranks"]),
            pd.DataFrame(headline["nemenyi_pvalues"]),
            headline["nemenyi_cd"],
            options.alpha,
            f"{builder.metric}: mean rank over {headline['n_blocks']} blocks ({headline['blocks']})",
            builder.figures_dir / "cd_diagram.png",
        )
        builder.figure(path, f"Critical difference diagram of {builder.metric} (Nemenyi, α = {options.alpha})")
    for reference in builder.references:
        builder.wilcoxon_table(headline, reference)
    bootstrap = builder.bootstrap()
    builder.bootstrap_table(bootstrap)
    builder.friedman_table(comparisons)

    if not deltas.empty:
        parts.append(Heading("Delta_m%"))
        parts.append(Paragraph(_delta_m_text(builder.info, deltas, builder.tabulated)))

    cost = builder.cost_frame()
    if not cost.empty:
        parts.append(Heading("Cost"))
        builder.cost_table(cost)
        phases = [f"{p}_ms" for p in STEP_PHASES if f"{p}_ms" in cost["mean"]]
        if phases:
            bars = cost["mean"][phases].rename(columns=lambda c: c.removesuffix("_ms"))
            bars.index = [m if len(builder.datasets) == 1 else f"{d}: {m}" for d, m in cost.index]
            builder.figure(
                report_plots.cost_bars(bars, builder.figures_dir / "cost.png"),
                "Milliseconds per training step by phase",
            )

    parts.append(Heading("Training curves"))
    figures_before = len(parts)
    builder.training_figures()
    if len(parts) == figures_before:
        parts.append(Paragraph("No per-epoch history is available (the results did not come from an MLflow store)."))

    if builder.warnings:
        parts.append(Heading("Warnings"))
        parts.extend(Paragraph(w) for w in builder.warnings)

    stats = {
        "source": results.source,
        "command": options.command,
        "metric": builder.metric,
        "alpha": options.alpha,
        "reference": builder.reference,
        "reference_reason": builder.reference_reason,
        "methods": builder.methods,
        "datasets": builder.datasets,
        "metrics": comparisons,
        "delta_m": {
            "definitions": CONVENTIONS,
            "sign": "positive = better than the baseline",
            "values": {f"{b} ({c})": {m: float(v) for m, v in values.items()} for (b, c), values in deltas.items()},
        },
        "paired_bootstrap_mean_auroc": bootstrap,
        "tables": builder.tables,
        "warnings": builder.warnings,
    }
    datasets = ", ".join(builder.datasets) if len(builder.datasets) <= 3 else f"{len(builder.datasets)} data sets"
    title = f"Comparison of methods on {datasets}"
    files = [out / "report.md", out / "report.html", out / "stats.json"]
    files[0].write_text(to_markdown(title, parts))
    files[1].write_text(to_html(title, parts, out))
    files[2].write_text(json.dumps(_json_ready(stats), indent=2, allow_nan=False))
    files += write_latex_tables(parts, out / "tables")
    files += [out / part.path for part in parts if isinstance(part, Figure)]
    return Report(out, stats, files, builder.warnings)
