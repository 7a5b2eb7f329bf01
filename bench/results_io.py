"""Results in the long format ``method,dataset,seed,metric,value``: from MLflow, from and to CSV.

One row per (method, data set, seed, metric). ``dataset`` is a task suite (e.g.
``cxr14-synthetic``) or any single data set or task; ``seed`` is kept as text. Quality
metrics keep the names the suites give them (``auroc/Atelectasis``, ``mean_auroc``); cost
metrics are prefixed ``cost/`` (``cost/step_ms``, ``cost/forward_ms``, ``cost/peak_memory_mb``,
``cost/train_seconds``) and are never ranked.

From an MLflow store (``bench run`` logs there) only runs with status FINISHED count, and
never the runs of tuning studies (``bench tune``, tagged :data:`~bench.tracking.TUNING_STUDY_TAG`):
their ``test/<metric>`` become ``<metric>`` and their ``summary/<cost>`` become ``cost/<cost>``.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
from tqdm.auto import tqdm

import tasks
from bench.credentials import masked
from bench.stats import family_of, task_of
from bench.tracking import TUNED_FROM_TAG, TUNING_STUDY_TAG, experiment_name, first_contact

LONG_COLUMNS = ("method", "dataset", "seed", "metric", "value")
COST_PREFIX = "cost/"
EXPERIMENT_PREFIX = experiment_name("")
PREDICTIONS_ARTIFACT = "test_predictions.csv"
"""Artifact with columns ``id``, ``prob/<task>``, ``label/<task>`` (see ``bench/train.py``)."""


class NoResultsError(ValueError):
    """The input holds no result to report on; the message says where it looked."""


@dataclass(frozen=True)
class RunRecord:
    """One FINISHED MLflow run of ``bench run`` (never a tuning trial)."""

    run_id: str
    dataset: str
    method: str
    seed: str
    primary_metric: str
    metric_keys: tuple[str, ...]


@dataclass
class Results:
    """Long-format results and where they came from.

    Attributes:
        long: the rows ``method, dataset, seed, metric, value``.
        source: where they were read, in words.
        runs: the MLflow runs behind them (empty for a CSV).
        primary_metrics: data set -> the metric its runs selected checkpoints by, when known.
        warnings: what was dropped or doubtful while reading.
    """

    long: pd.DataFrame
    source: str
    runs: list[RunRecord] = field(default_factory=list)
    primary_metrics: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def quality(self) -> pd.DataFrame:
        """The rows of quality metrics (everything but ``cost/*``)."""
        return self.long[~self.long["metric"].str.startswith(COST_PREFIX)]

    def cost(self) -> pd.DataFrame:
        """The rows of cost metrics, ``cost/`` removed from their names."""
        rows = self.long[self.long["metric"].str.startswith(COST_PREFIX)].copy()
        rows["metric"] = rows["metric"].str.removeprefix(COST_PREFIX)
        return rows


def _store_description(tracking_uri: str, experiments: Sequence[str]) -> str:
    return f"experiment(s) {', '.join(experiments) or '(none)'} of the MLflow store {masked(tracking_uri)}"


def _experiments(client: MlflowClient, tracking_uri: str, requested: Sequence[str] | None) -> dict[str, str]:
    """Experiment id -> name of the ``requested`` experiments, or of every ``mtl-bench/*`` one."""
    known = {e.experiment_id: e.name for e in client.search_experiments()}
    if not requested:
        return {i: name for i, name in known.items() if name.startswith(EXPERIMENT_PREFIX)}
    unknown = [name for name in requested if name not in known.values()]
    if unknown:
        raise NoResultsError(
            f"no experiment {', '.join(unknown)} in the MLflow store {masked(tracking_uri)}; it holds: "
            f"{', '.join(known.values()) or 'no experiment'}"
        )
    return {i: name for i, name in known.items() if name in requested}


def _finished_runs(client: MlflowClient, experiment_ids: list[str]) -> list[Run]:
    runs: list[Run] = []
    page_token = None
    while True:
        page = client.search_runs(
            experiment_ids,
            filter_string="attributes.status = 'FINISHED'",
            order_by=["attributes.start_time ASC"],
            page_token=page_token,
        )
        runs.extend(page)
        page_token = page.token
        if not page_token:
            return runs


def _run_rows(run: Run, dataset: str, method: str, seed: str) -> list[tuple[str, str, str, str, float]]:
    rows = []
    for key, value in run.data.metrics.items():
        if key.startswith("test/"):
            rows.append((method, dataset, seed, key.removeprefix("test/"), value))
        elif key.startswith("summary/") and not key.startswith("summary/best_"):
            rows.append((method, dataset, seed, COST_PREFIX + key.removeprefix("summary/"), value))
    return rows


PER_RUN_PARAMS = ("method", "seed", "results", "tracking_uri", "save_checkpoint", "device")
"""Params that differ between the runs of one comparison by design (or say only where a run went)."""
TUNED_PARAMS = ("lr", "weight_decay")
"""Params that ``run --tuned`` sets per method: compared only among the runs of one method."""
NAMED_RUNS = 3
"""A group of at most this many runs is named by run id in a warning; a larger one is counted."""


def _delete_advice(tracking_uri: str) -> str:
    return f"MLFLOW_TRACKING_URI={masked(tracking_uri)} mlflow runs delete --run-id ID"


def _run_group(value: str, run_ids: list[str]) -> str:
    if len(run_ids) <= NAMED_RUNS:
        return f"{value} in run(s) {', '.join(run_ids)}"
    return f"{value} in {len(run_ids)} runs"


def _setting_differences(runs: dict[tuple[str, str, str], Run], tracking_uri: str) -> list[str]:
    """One warning per data set whose runs differ in a setting other than method, seed and
    hyperparameters (and, between methods, the learning rate and weight decay of tuned runs)."""
    messages = []
    for dataset in dict.fromkeys(cell[0] for cell in runs):
        values: dict[str, dict[str, list[str]]] = {}
        for (run_dataset, method, _), run in runs.items():
            if run_dataset != dataset:
                continue
            tuned = TUNED_FROM_TAG in run.data.tags
            for name, value in run.data.params.items():
                if name in PER_RUN_PARAMS or name.startswith("hp."):
                    continue
                setting = f"{name} of {method} (tuned)" if tuned and name in TUNED_PARAMS else name
                values.setdefault(setting, {}).setdefault(value, []).append(run.info.run_id)
        differing = {setting: groups for setting, groups in values.items() if len(groups) > 1}
        if differing:
            messages.append(
                f"the runs on {dataset} differ in "
                + "; ".join(
                    f"{setting} ({', '.join(_run_group(v, ids) for v, ids in sorted(groups.items()))})"
                    for setting, groups in sorted(differing.items())
                )
                + ": they may not be comparable. To compare like with like, delete the runs of the other "
                f"setting ({_delete_advice(tracking_uri)}), or train each setting into its own --results "
                "directory and report each one"
            )
    return messages


def load_mlflow(tracking_uri: str, experiments: Sequence[str] | None = None) -> Results:
    """The FINISHED runs of ``experiments`` (default: every ``mtl-bench/*`` experiment), less
    the runs of tuning studies.

    When a (data set, method, seed) was run more than once, the latest run counts and the
    others are named in ``warnings``.

    Raises:
        NoResultsError: no such experiment, or no FINISHED run in them.
    """
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise NoResultsError(
            f"there is no MLflow store at {tracking_uri}: train first (python -m bench run), or point "
            "--results, --tracking-uri or --from at existing results"
        )
    client = MlflowClient(tracking_uri=tracking_uri)
    with first_contact(tracking_uri):  # a tracking server that is down fails in seconds
        names_by_id = _experiments(client, tracking_uri, experiments)
    names = list(names_by_id.values())
    finished = _finished_runs(client, list(names_by_id)) if names_by_id else []
    runs = [run for run in finished if TUNING_STUDY_TAG not in run.data.tags]
    if not runs:
        tuning = len(finished) - len(runs)
        but = (
            f" but {tuning} of tuning studies (python -m bench tune), which are not results; train with "
            "the tuned settings: python -m bench run --tuned"
            if tuning
            else ""
        )
        raise NoResultsError(
            f"no FINISHED runs in {_store_description(tracking_uri, names)}{but}: train with python -m bench run, "
            "or choose another store or experiment (--results, --tracking-uri, --experiment)"
        )
    latest: dict[tuple[str, str, str], Run] = {}
    superseded: list[str] = []
    for run in runs:  # oldest first: a later run of the same cell replaces an earlier one
        params = run.data.params
        dataset = params.get("task") or names_by_id[run.info.experiment_id].removeprefix(EXPERIMENT_PREFIX)
        cell = (dataset, method_label(params), params.get("seed", ""))
        if cell in latest:
            superseded.append(
                f"{latest[cell].info.run_id} ({cell[1]} seed {cell[2]} on {cell[0]}, run again in {run.info.run_id})"
            )
        latest[cell] = run
    results = Results(long=pd.DataFrame(columns=LONG_COLUMNS), source=_store_description(tracking_uri, names))
    if superseded:
        results.warnings.append(
            f"{len(superseded)} older run(s) of a method and seed run again later were left out: "
            + "; ".join(superseded)
            + f". The latest run of each counts; to count an older one instead, delete the later one "
            f"({_delete_advice(tracking_uri)})"
        )
    results.warnings.extend(_setting_differences(latest, tracking_uri))
    rows = []
    for (dataset, method, seed), run in latest.items():
        rows.extend(_run_rows(run, dataset, method, seed))
        primary = run.data.params.get("primary_metric", "")
        results.runs.append(RunRecord(run.info.run_id, dataset, method, seed, primary, tuple(run.data.metrics)))
        if primary:
            results.primary_metrics.setdefault(dataset, primary)
    results.long = pd.DataFrame(rows, columns=LONG_COLUMNS)
    return results


def method_label(params: dict[str, str]) -> str:
    """A run's method as reports name it: ``<method>``, or ``<method>@features`` for a run whose
    gradient methods weighed by the feature-level Gramian (``--grad-level features``)."""
    method = params.get("method", "")
    return f"{method}@features" if params.get("grad_level") == "features" else method


def read_long_csv(path: str | Path) -> Results:
    """Read a results CSV with the columns ``method,dataset,seed,metric,value`` (extra columns ignored).

    Rows without a value are dropped (named in ``warnings``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file does not parse as a CSV, a column is missing, a value is not a
            finite number, or a (method, dataset, seed, metric) appears twice.
        NoResultsError: the file is empty or has no row with a value.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no results CSV at {path}")
    try:
        frame = pd.read_csv(path, dtype={c: str for c in LONG_COLUMNS if c != "value"}, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise NoResultsError(
            f"{path} is empty; a results CSV has the header line {','.join(LONG_COLUMNS)} and one row per "
            "method, data set, seed and metric"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} does not read as a CSV ({' '.join(str(error).split())}); a results CSV has the columns "
            f"{','.join(LONG_COLUMNS)}, comma-separated, one row per method, data set, seed and metric"
        ) from None
    missing = [c for c in LONG_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path} lacks the column(s) {', '.join(missing)}; a results CSV needs the columns "
            f"{','.join(LONG_COLUMNS)}, one row per method, data set, seed and metric (it has: "
            f"{', '.join(map(str, frame.columns))})"
        )
    frame = frame[list(LONG_COLUMNS)]
    text = frame["value"].astype(str).str.strip()
    empty = text.isin(["", "nan", "NaN", "NA"])
    values = pd.to_numeric(text.where(~empty), errors="coerce")
    bad = frame.index[values.isna() & ~empty]
    if len(bad):
        raise ValueError(
            f"{path}: the value column must hold numbers; CSV line(s) {_csv_lines(bad)} do not (e.g. {text[bad[0]]!r})"
        )
    infinite = frame.index[values.isin([math.inf, -math.inf])]
    if len(infinite):
        raise ValueError(
            f"{path}: the value column must hold finite numbers; CSV line(s) {_csv_lines(infinite)} hold "
            f"{text[infinite[0]]!r}, which would rank as the best or worst result: fix or remove those rows"
        )
    frame = frame.assign(value=values)
    results = Results(long=frame[~empty].reset_index(drop=True), source=f"the results CSV {path}")
    if empty.any():
        results.warnings.append(f"{int(empty.sum())} row(s) of {path} without a value were left out")
    duplicated = results.long.duplicated(subset=["method", "dataset", "seed", "metric"], keep=False)
    if duplicated.any():
        first = results.long[duplicated].iloc[0]
        raise ValueError(
            f"{path} holds {int(duplicated.sum())} rows that repeat a (method, dataset, seed, metric), e.g. "
            f"{first['method']}, {first['dataset']}, seed {first['seed']}, {first['metric']}: keep one value per cell"
        )
    if results.long.empty:
        raise NoResultsError(f"{path} holds no row with a value")
    return results


def _csv_lines(rows: pd.Index) -> str:
    """The line numbers in the CSV file of the data ``rows`` (the header is line 1), the first 10."""
    return ", ".join(str(i + 2) for i in rows[:10])


def write_long_csv(results: Results, path: str | Path) -> Path:
    """Write the long-format rows to ``path`` in their order (runs by start time); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    results.long.to_csv(path, index=False)
    return path


def load_histories(tracking_uri: str, runs: Iterable[RunRecord], prefixes: Collection[str]) -> pd.DataFrame:
    """Per-epoch values of every logged metric whose key starts with one of ``prefixes``.

    Returns rows ``dataset, method, seed, key, step, value``.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    rows = []
    runs = list(runs)
    for run in tqdm(runs, desc="reading training curves", unit="run", disable=None):
        for key in run.metric_keys:
            if key.startswith(tuple(prefixes)):
                for point in client.get_metric_history(run.run_id, key):
                    rows.append((run.dataset, run.method, run.seed, key, point.step, point.value))
    return pd.DataFrame(rows, columns=["dataset", "method", "seed", "key", "step", "value"])


@contextmanager
def _one_progress_bar() -> Iterator[None]:
    """Silence MLflow's per-file download bars (``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``) under ours."""
    name = MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name
    previous = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def load_test_predictions(tracking_uri: str, runs: Iterable[RunRecord]) -> dict[str, pd.DataFrame]:
    """run id -> its ``test_predictions.csv`` artifact, for the runs that logged one."""
    client = MlflowClient(tracking_uri=tracking_uri)
    predictions = {}
    runs = list(runs)
    with tempfile.TemporaryDirectory() as scratch, _one_progress_bar():
        for run in tqdm(runs, desc="reading test predictions", unit="run", disable=None):
            if PREDICTIONS_ARTIFACT not in {a.path for a in client.list_artifacts(run.run_id)}:
                continue
            local = client.download_artifacts(run.run_id, PREDICTIONS_ARTIFACT, dst_path=scratch)
            predictions[run.run_id] = pd.read_csv(local)
    return predictions


@dataclass(frozen=True)
class MetricInfo:
    """What the report needs to know about the metrics of each data set.

    Attributes:
        directions: metric key -> ``"maximize"`` or ``"minimize"``.
        task_metrics: data set -> task -> its metric keys (what Delta_m averages).
        primary: data set -> the metric the data set is compared by when none is chosen.
        reported: data set -> the metric keys its summary tables show: those its task suite
            reports (``TaskSuite.reported_metrics``), else every key without a task.
        notes: how the directions were found, where not from a task suite.
    """

    directions: dict[str, str]
    task_metrics: dict[str, dict[str, tuple[str, ...]]]
    primary: dict[str, str]
    reported: dict[str, tuple[str, ...]]
    notes: tuple[str, ...] = ()


def _suite_declarations(
    name: str,
) -> tuple[dict[str, str], dict[str, tuple[str, ...]], str, tuple[str, ...]] | None:
    """A registered suite's metric directions, task metrics, primary and reported metrics, without its data.

    ``TaskSuite.metric_directions()`` and ``task_metrics()`` are read from an instance made
    without running the constructor (which builds the data); they rely on class attributes
    only (``task_names``, ``primary_metric``). ``None`` when ``name`` is no registered suite
    or its declarations need a built suite.
    """
    if name not in tasks.available():
        return None
    suite_class = tasks.suite_class(name)
    bare = suite_class.__new__(suite_class)
    try:
        return (
            dict(bare.metric_directions()),
            dict(bare.task_metrics()),
            suite_class.primary_metric,
            suite_class.reported_metrics(),
        )
    except AttributeError:
        return None


def _named_in(key: str, names: Collection[str]) -> bool:
    return key in names or family_of(key) in names


def metric_info(results: Results, minimize: Collection[str] = ()) -> MetricInfo:
    """Directions, per-task metric groups and primary metric of every data set in ``results``.

    A data set named like a registered task suite takes them from the suite. Otherwise (and
    for keys the suite does not declare) a metric is better when higher unless it or its
    family is named in ``minimize``; per-task keys ``<metric>/<task>`` are grouped by task
    (keys without ``/`` are then left out of Delta_m, being means over tasks); when no key has
    a ``/``, every key is a task of its own. ``minimize`` always wins.
    """
    quality = results.quality()
    directions: dict[str, str] = {}
    task_metrics: dict[str, dict[str, tuple[str, ...]]] = {}
    primary: dict[str, str] = dict(results.primary_metrics)
    reported: dict[str, tuple[str, ...]] = {}
    guessed: set[str] = set()
    notes: list[str] = []
    for dataset, rows in quality.groupby("dataset", sort=True):
        keys = sorted(rows["metric"].unique())
        declared = _suite_declarations(str(dataset))
        suite_directions, suite_tasks = (declared[0], declared[1]) if declared else ({}, {})
        if declared:
            primary.setdefault(str(dataset), declared[2])
        shown = declared[3] if declared else tuple(k for k in keys if "/" not in k)
        reported[str(dataset)] = tuple(k for k in shown if k in keys)
        for key in keys:
            direction = "minimize" if _named_in(key, minimize) else suite_directions.get(key)
            if direction is None:
                direction = "maximize"
                guessed.add(key)
            if directions.setdefault(key, direction) != direction:
                raise ValueError(f"metric {key!r} is better when higher in one data set and lower in another")
        if suite_tasks:
            present = {task: tuple(k for k in group if k in keys) for task, group in suite_tasks.items()}
            task_metrics[str(dataset)] = {task: group for task, group in present.items() if group}
            absent = sorted(k for group in suite_tasks.values() for k in group if k not in keys)
            if absent:
                notes.append(f"{dataset}: no values of {', '.join(absent)}, so Delta_m leaves them out")
        else:
            per_task = [k for k in keys if "/" in k]
            groups: dict[str, list[str]] = {}
            for key in per_task or keys:
                groups.setdefault(task_of(key) or key, []).append(key)
            task_metrics[str(dataset)] = {task: tuple(group) for task, group in groups.items()}
    if guessed:
        notes.append(
            f"taken as better when higher (no task suite declares them; name lower-is-better ones with "
            f"--minimize): {', '.join(sorted(guessed))}"
        )
    return MetricInfo(directions, task_metrics, primary, reported, tuple(notes))
