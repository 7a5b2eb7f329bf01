"""Hyperparameter tuning with Optuna: one study per (task, method), the same budget for each.

    python -m bench tune --methods mgda,deepchest --task cxr14-synthetic --trials 50 [--storage URL] [--workers K]

**Search space.** For every method the learning rate and the weight decay
(:data:`COMMON_SPACE`, log-uniform), plus every hyperparameter the method declares tunable
(:class:`methods.HParam`): a float or integer range (log scale where declared) or the
declared choices. ``--space NAME=LOW:HIGH`` or ``--space NAME=A,B,...`` replaces a dimension
(``NAME``: ``lr``, ``weight_decay`` or ``METHOD.HPARAM``; one value fixes it); a
hyperparameter fixed with ``--hp`` is not searched.

**Objective.** The best validation value of the suite's primary metric over the epochs of
one training run (with the one seed of ``--seeds``), maximised or minimised as the suite
says; the run is the harness's ordinary, crash-safe training run (:func:`bench.train.train_run`).

**Pruning.** After each epoch the validation value is reported to the trial; Optuna's
``MedianPruner`` stops a trial whose value is worse than the median of the earlier trials at
the same epoch, once 5 trials have finished and from the second epoch on. A pruned trial
counts against the budget like a finished one.

**Sampling.** TPE (Optuna's default sampler), seeded for each trial with the training seed
plus the trial number (a retry: the number of the trial it repeats; it keeps that trial's
parameters when they were drawn), so a single worker repeats a study exactly.

**Budget and workers.** Each study holds ``--trials`` trials, queued up front and claimed
exactly once by the workers (:mod:`bench.studies`); with ``--workers K`` this process and K-1
it starts work on them, and ``python -m bench worker --storage URL`` joins from anywhere. Running the command
again adds trials up to a larger ``--trials`` and otherwise trains nothing again.

**Trials see no test data.** A trial trains and validates; it is not tested and keeps no
best checkpoint, unless ``--full-trials`` asks for both (test metrics and predictions, and the
checkpoint unless ``--no-checkpoint``), as for every trial that starts after that command.

**MLflow.** Each study is a parent run ``tune-<method>`` in the task's experiment (tags:
study, storage; at the end the best value as metric ``best_value`` and the best parameters
as tags ``best.<name>``; KILLED when the command is interrupted, RUNNING again when it is run
again); each trial is a training run nested under it. All of them carry the
tag :data:`~bench.tracking.TUNING_STUDY_TAG`, by which ``bench report`` leaves them out.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
    json_to_distribution,
)
from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

import methods
import tasks
from bench.cli import flags_to_layers
from bench.credentials import masked
from bench.errors import INPUT_ERRORS, print_error
from bench.jobs import ClaimCheck, ClaimOutcome, run_claimed
from bench.signals import interrupts_held, interruption_exit_code, interruption_reason
from bench.spec import RunSpec, parse_assignments, resolve_spec
from bench.studies import (
    CONFIG_ATTR,
    FAILURE_ATTR,
    KIND_ATTR,
    SPEC_ATTR,
    WHERE_KEYS,
    WORKER_ATTR,
    Claim,
    SharedStudy,
    add_waiting_trials,
    create_shared_study,
    default_storage,
    open_storage,
)
from bench.sweep_cli import StorageOptions
from bench.tracking import TUNING_STUDY_TAG, Tracker, end_run_by_id, flatten
from bench.train import RunResult, StopTraining, train_run
from methods.base import HParam

if TYPE_CHECKING:
    from bench.worker import WorkerContext

COMMON_SPACE: dict[str, BaseDistribution] = {
    "lr": FloatDistribution(1e-5, 1e-2, log=True),
    "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
}
"""The dimensions every method is tuned over: learning rate and weight decay, log-uniform."""
SPACE_ATTR = "space"
METHOD_ATTR = "method"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
FULL_TRIALS_ATTR = "full_trials"
"""Study user attribute: whether trials are also tested and keep their best checkpoint
(``--full-trials`` of the latest ``tune`` command)."""
PRUNE_AFTER_TRIALS = 5
PRUNE_FROM_EPOCH = 2
"""MedianPruner's ``n_startup_trials`` and ``n_warmup_steps``: the steps are the epochs,
counted from 1, and a trial is not pruned before step ``n_warmup_steps``."""


def study_name(task: str, method: str) -> str:
    """The name of the tuning study of ``method`` on ``task``."""
    return f"tune/{task}/{method}"


def pruner() -> optuna.pruners.BasePruner:
    """The pruner of every tuning study (see the module docstring)."""
    return optuna.pruners.MedianPruner(n_startup_trials=PRUNE_AFTER_TRIALS, n_warmup_steps=PRUNE_FROM_EPOCH)


def declared_dimension(method: str, hparam: HParam) -> BaseDistribution:
    """The search dimension of a tunable hyperparameter, from its declaration."""
    if hparam.choices is not None:
        return CategoricalDistribution(list(hparam.choices))
    if hparam.kind is bool:
        return CategoricalDistribution([False, True])
    if hparam.kind in (int, float) and hparam.low is not None and hparam.high is not None:
        if hparam.kind is int:
            return IntDistribution(int(hparam.low), int(hparam.high), log=hparam.log)
        return FloatDistribution(float(hparam.low), float(hparam.high), log=hparam.log)
    raise ValueError(
        f"{method}.{hparam.name} is declared tunable but has neither a range (low, high) nor choices; "
        "declare them, or set tunable=False"
    )


def tunable_hparams(method: str) -> dict[str, HParam]:
    """The hyperparameters ``method`` declares tunable (per-task sequences never are)."""
    return {h.name: h for h in methods.hparams(method) if h.tunable and h.kind is not tuple}


def parse_space(items: Sequence[str], chosen_methods: Sequence[str]) -> dict[str, dict[str, str]]:
    """``--space`` items -> ``{method: {dimension: text}}``; ``lr``/``weight_decay`` apply to all."""
    overrides: dict[str, dict[str, str]] = {m: {} for m in chosen_methods}
    for key, text in parse_assignments(list(items), "--space").items():
        name = key.replace("-", "_")
        if name in COMMON_SPACE:
            for method in chosen_methods:
                overrides[method][name] = text
            continue
        method, dot, hparam = key.rpartition(".")
        if not dot or not method:
            raise ValueError(
                f"--space {key}={text}: expected lr, weight_decay or METHOD.HPARAM, e.g. cagrad.calpha=0.2:0.8"
            )
        if method not in overrides:
            raise ValueError(f"--space {key}: {method!r} is not among the methods tuned ({', '.join(chosen_methods)})")
        overrides[method][hparam] = text
    return overrides


def search_space(method: str, fixed: Mapping[str, Any], overrides: Mapping[str, str]) -> dict[str, BaseDistribution]:
    """The search space of ``method``: :data:`COMMON_SPACE` and its tunable hyperparameters,
    without those ``fixed`` (given with ``--hp``), with ``overrides`` (``--space``) applied.

    An override naming a hyperparameter the method does not declare tunable, or fixed with
    ``--hp``, or a range outside the declared one, is an error that lists what is valid.
    """
    declared = tunable_hparams(method)
    space: dict[str, BaseDistribution] = {
        **COMMON_SPACE,
        **{name: declared_dimension(method, h) for name, h in declared.items() if name not in fixed},
    }
    for name, text in overrides.items():
        if name in fixed:
            raise ValueError(f"--space {method}.{name}: it is fixed with --hp {method}.{name}; give one or the other")
        if name not in space:
            valid = ", ".join(f"{n} ({h.describe()})" for n, h in declared.items()) or "none"
            raise ValueError(
                f"--space {method}.{name}: {method} declares no tunable hyperparameter {name!r}; "
                f"its tunable ones: {valid}; every method also has lr and weight_decay"
            )
        space[name] = _dimension_from_text(method, name, text, space[name], declared.get(name))
    return space


def _dimension_from_text(
    method: str, name: str, text: str, current: BaseDistribution, hparam: HParam | None
) -> BaseDistribution:
    """``LOW:HIGH`` (a range of the current kind and scale) or ``A,B,...`` (choices)."""
    where = f"--space {name if hparam is None else f'{method}.{name}'}={text}"

    def check(value: str) -> Any:
        if hparam is not None:
            try:
                return hparam.validate(value, method)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{where}: expected numbers") from None
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"{where}: {name} is searched on a log scale; give finite values > 0")
        return number

    low_text, colon, high_text = text.partition(":")
    if colon:
        if not isinstance(current, (FloatDistribution, IntDistribution)):
            raise ValueError(f"{where}: {name} takes choices (A,B,...), not a range")
        low, high = check(low_text.strip()), check(high_text.strip())
        if not low < high:
            raise ValueError(f"{where}: expected LOW < HIGH")
        kind = IntDistribution if isinstance(current, IntDistribution) else FloatDistribution
        return kind(low, high, log=current.log)
    choices = [check(v.strip()) for v in text.split(",") if v.strip()]
    if not choices:
        raise ValueError(f"{where}: expected LOW:HIGH or a comma list of values")
    return CategoricalDistribution(list(dict.fromkeys(choices)))


def suggest(trial: optuna.Trial, name: str, dimension: BaseDistribution) -> Any:
    """Sample ``name`` from ``dimension`` through the trial's public ``suggest_*`` methods."""
    if isinstance(dimension, FloatDistribution):
        return trial.suggest_float(name, dimension.low, dimension.high, log=dimension.log)
    if isinstance(dimension, IntDistribution):
        return trial.suggest_int(name, dimension.low, dimension.high, log=dimension.log)
    assert isinstance(dimension, CategoricalDistribution)
    return trial.suggest_categorical(name, list(dimension.choices))


def tuned_spec(spec: RunSpec, method: str, params: Mapping[str, Any]) -> RunSpec:
    """``spec`` with ``params`` (lr, weight_decay and ``method``'s hyperparameters) applied."""
    hparams = {k: v for k, v in params.items() if k not in COMMON_SPACE}
    return dataclasses.replace(
        spec,
        lr=float(params.get("lr", spec.lr)),
        weight_decay=float(params.get("weight_decay", spec.weight_decay)),
        hparams={**spec.hparams, method: {**spec.hparams.get(method, {}), **hparams}},
    )


def _study_spec(spec: RunSpec, method: str) -> dict[str, Any]:
    """The spec of one method's study, as stored with the study (and read back by workers)."""
    stored = spec.to_dict()
    stored["methods"] = [method]
    stored["hparams"] = {method: spec.method_hparams(method)} if spec.method_hparams(method) else {}
    return stored


def prepare_study(
    url: str,
    spec: RunSpec,
    suite: tasks.TaskSuite,
    method: str,
    space: Mapping[str, BaseDistribution],
    trials: int,
    heartbeat: int,
    tracker: Tracker,
    full_trials: bool,
) -> SharedStudy:
    """Create (or load and check) the study of ``method``, its MLflow parent run, and queue
    trials until the study holds ``trials`` of them (retries of dead workers' trials aside);
    ``full_trials`` applies to the trials that start from now on."""
    name = study_name(spec.task, method)
    stored_spec = _study_spec(spec, method)
    identity = {
        METHOD_ATTR: method,
        CONFIG_ATTR: {k: v for k, v in stored_spec.items() if k not in WHERE_KEYS},
        SPACE_ATTR: {n: distribution_to_json(d) for n, d in space.items()},
        KIND_ATTR: "tune",
    }
    shared = create_shared_study(url, name, suite.primary_direction, identity, {SPEC_ATTR: stored_spec}, heartbeat)
    client = MlflowClient(tracker.tracking_uri)
    if PARENT_RUN_ATTR in shared.attrs:
        client.update_run(shared.attrs[PARENT_RUN_ATTR], status="RUNNING")  # worked on again
    else:
        run = client.create_run(
            tracker.experiment_id,
            run_name=f"tune-{method}",
            tags={TUNING_STUDY_TAG: name, "optuna.storage": masked(url), "method": method},
        )
        params = {**flatten(stored_spec), **{f"space.{n}": repr(d) for n, d in space.items()}}
        client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
        shared.study.set_user_attr(PARENT_RUN_ATTR, run.info.run_id)
    shared.study.set_user_attr(FULL_TRIALS_ATTR, full_trials)
    add_waiting_trials(shared, [{} for _ in range(trials - budget(shared))])
    return shared


def budget(shared: SharedStudy) -> int:
    """The number of trials the study was given: its trials less the retries of dead workers' ones."""
    return sum("failed_trial" not in t.system_attrs for t in shared.study.get_trials(deepcopy=False))


def trial_label(shared: SharedStudy, claim: Claim) -> str:
    """``tune/<task>/<method> trial k of n (#number)``: k counts from 1, ``#number`` is Optuna's
    trial number (from 0); a retry of a dead worker's trial counts as the trial it repeats."""
    number = f"#{claim.frozen.number}"
    if claim.first_number != claim.frozen.number:
        number += f", retrying #{claim.first_number}"
    return f"{shared.name} trial {claim.first_number + 1} of {budget(shared)} ({number})"


def format_params(params: Mapping[str, Any]) -> str:
    """``lr=0.000316, weight_decay=1.05e-05, rescale=1``: floats to 3 significant digits."""
    return ", ".join(f"{name}={_short(value)}" for name, value in params.items())


def outcome_line(label: str, outcome: ClaimOutcome, metric: str, last_value: float | None) -> str:
    """One line on how a trial ended: state (and why, when not complete), its value (the best
    validation value; for a pruned trial the last one reported) to 4 significant digits, duration."""
    parts = [outcome.state.name if outcome.reason is None else f"{outcome.state.name} ({outcome.reason})"]
    if outcome.state == TrialState.COMPLETE and outcome.result is not None and outcome.result.best_val is not None:
        parts.append(f"best validation {metric} {outcome.result.best_val:.4g}")
    elif outcome.state == TrialState.PRUNED and last_value is not None:
        parts.append(f"last validation {metric} {last_value:.4g}")
    parts.append(f"{outcome.seconds:.1f} s")
    return f"{label}: {', '.join(parts)}"


def run_tuning_trial(shared: SharedStudy, claim: Claim, context: WorkerContext) -> str:
    """Train one claimed trial of a tuning study; tell Optuna its outcome; return the state name."""
    attrs = shared.attrs
    method = attrs[METHOD_ATTR]
    spec = context.spec(shared)
    space = {n: json_to_distribution(d) for n, d in attrs[SPACE_ATTR].items()}
    first = claim.first_number
    # The parameters are drawn (and stored on the trial) first: a retry of this trial keeps them.
    shared.study.sampler = optuna.samplers.TPESampler(seed=spec.seeds[0] + first)
    shared.study.pruner = pruner()
    trial = optuna.Trial(shared.study, claim.trial_id)
    params = {name: suggest(trial, name, dimension) for name, dimension in space.items()}
    suite = context.suite(spec)
    full = bool(attrs.get(FULL_TRIALS_ATTR, False))
    trial_spec = tuned_spec(spec, method, params)
    if not full:
        trial_spec = dataclasses.replace(trial_spec, save_checkpoint=False)
    reported: list[float] = []
    label = trial_label(shared, claim)
    context.console.print(f"{label}: {format_params(params)}")

    def train(check: ClaimCheck) -> RunResult:
        def report(epoch: int, value: float) -> None:
            reported.append(value)
            check()
            trial.report(value, epoch)
            if trial.should_prune():
                raise StopTraining(f"pruned by Optuna's {type(shared.study.pruner).__name__} after epoch {epoch}")

        with Tracker(spec.tracking_uri, spec.task, spec.results) as tracker:
            return train_run(
                trial_spec,
                suite,
                method,
                spec.seeds[0],
                tracker,
                run_name=f"{method}-trial{first}",
                identity={"study": shared.name, "trial": first},
                tags={
                    "mlflow.parentRunId": attrs[PARENT_RUN_ATTR],
                    TUNING_STUDY_TAG: shared.name,
                    "optuna.trial": str(claim.frozen.number),
                },
                on_epoch=report,
                before_writes=check,
                evaluate_test=full,
            )

    outcome = run_claimed(shared, claim, context.console, train)
    context.console.print(outcome_line(label, outcome, suite.primary_metric, reported[-1] if reported else None))
    return outcome.state.name


def interrupt_study(shared: SharedStudy, tracking_uri: str, reason: str) -> None:
    """End the study's MLflow parent run KILLED, saying why: the command that worked on the
    study was interrupted. Run again, the command sets it RUNNING."""
    end_run_by_id(tracking_uri, shared.attrs[PARENT_RUN_ATTR], "KILLED", reason)


def finish_study(shared: SharedStudy, tracking_uri: str) -> str | None:
    """Close the study's MLflow parent run once no trial is waiting or running.

    FINISHED with the best value and parameters when a trial completed; FAILED otherwise,
    and then the returned text says why (``None`` when the study is fine or still going).
    """
    trials = shared.study.get_trials(deepcopy=False)
    if any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in trials):
        return None
    client = MlflowClient(tracking_uri)
    parent = shared.attrs[PARENT_RUN_ATTR]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        failures = Counter(t.user_attrs.get(FAILURE_ATTR, t.state.name) for t in trials)
        reasons = "; ".join(f"{reason} ({n} trial{'s' * (n > 1)})" for reason, n in failures.most_common(3))
        message = f"no trial of {shared.name} completed: {len(trials)} trials ended as {reasons}"
        end_run_by_id(tracking_uri, parent, "FAILED", message)
        return message
    best = shared.study.best_trial
    client.log_metric(parent, "best_value", float(best.value))  # type: ignore[arg-type]
    client.set_tag(parent, "best_trial", str(best.number))
    for name, value in best.params.items():
        client.set_tag(parent, f"best.{name}", str(value))
    end_run_by_id(tracking_uri, parent, "FINISHED")
    return None


@dataclass(frozen=True)
class TunedSetting:
    """The best trial of a method's tuning study, as ``bench run --tuned`` applies it."""

    study: str
    trial: int
    value: float
    params: dict[str, Any]


def tuned_settings(url: str, task: str, chosen_methods: Sequence[str]) -> dict[str, TunedSetting]:
    """The best trial of each method's study at ``url``; an error when one has none."""
    storage = open_storage(url, must_exist=True)
    settings = {}
    for method in chosen_methods:
        name = study_name(task, method)
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            raise ValueError(
                f"--tuned: no tuning study {name!r} in {masked(url)}; tune first: python -m bench tune "
                f"--methods {method} --task {task} --trials N (with the same --storage)"
            ) from None
        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            raise ValueError(f"--tuned: study {name!r} in {masked(url)} has no completed trial yet")
        best = study.best_trial
        settings[method] = TunedSetting(name, best.number, float(best.value), dict(best.params))  # type: ignore[arg-type]
    return settings


def tune_command(args: argparse.Namespace, console: Console) -> int:
    """``python -m bench tune``: exit code 0 when every study has a completed trial, 1 when one
    has none, 2 on bad input (nothing is written then), 130 on Ctrl-C and 143 on SIGTERM."""
    from bench.worker import run_workers  # the worker imports this module

    given = vars(args)
    trials, space_items = given.pop("trials"), given.pop("space", [])
    full_trials = given.pop("full_trials", False)
    try:
        options = StorageOptions.pop(args)
        if trials < 1:
            raise ValueError(f"--trials: expected a positive integer, got {trials}")
        for name in COMMON_SPACE:
            if name in given:
                flag = name.replace("_", "-")
                raise ValueError(f"--{flag}: tuning searches {name}; to fix it give --space {name}=VALUE")
        spec = resolve_spec(*flags_to_layers(args))
        if len(spec.seeds) != 1:
            raise ValueError(f"--seeds: a tuning trial trains once, with one seed; got {spec.seeds}")
        overrides = parse_space(space_items, spec.methods)
        spaces = {m: search_space(m, spec.method_hparams(m), overrides[m]) for m in spec.methods}
        suite = tasks.create(spec.task, **spec.task_options)
        url = options.storage or default_storage(spec.results)
        open_storage(url)
        with Tracker(spec.tracking_uri, spec.task, spec.results) as tracker:
            studies = [
                prepare_study(url, spec, suite, m, spaces[m], trials, options.heartbeat, tracker, full_trials)
                for m in spec.methods
            ]
    except INPUT_ERRORS as error:
        return print_error(console, error)
    console.print(
        f"tuning {', '.join(spec.methods)} on {spec.task}: {trials} trials each, storage {masked(url)}, "
        f"{options.workers or 1} worker(s); MLflow at {masked(spec.tracking_uri)}"
    )
    try:
        run_workers(url, [s.name for s in studies], options.workers or 1, spec.results, spec.tracking_uri, console)
    except KeyboardInterrupt as interrupt:
        reason = interruption_reason(interrupt)
        with interrupts_held(deliver=False):
            for shared in studies:
                interrupt_study(shared, spec.tracking_uri, reason)
        console.print(f"[yellow]{reason}: running trials are queued again; run the same command to go on[/]")
        return interruption_exit_code(interrupt)
    failures = [message for s in studies if (message := finish_study(s, spec.tracking_uri)) is not None]
    console.print(tuning_table(studies))
    for message in failures:
        print_error(console, message)
    unfinished = [s.name for s in studies if s.counts()["WAITING"] + s.counts()["RUNNING"]]
    if unfinished:
        console.print(
            f"[yellow]trials of {', '.join(unfinished)} are still waiting or running; run the same command "
            "(or python -m bench worker) again to finish them[/]"
        )
    return 1 if failures or unfinished else 0


def tuning_table(studies: Sequence[SharedStudy]) -> Table:
    """Per study: trials by state, the best value and parameters, trials per worker."""
    table = Table(title="tuning studies tune/<task>/<method> (browse them: optuna-dashboard STORAGE_URL)")
    for column in ("method", "done/pruned/failed/left", "best value", "best parameters", "trials per worker"):
        table.add_column(column)
    for shared in studies:
        trials = shared.study.get_trials(deepcopy=False)
        counts = Counter(t.state for t in trials)
        workers = Counter(t.user_attrs[WORKER_ATTR] for t in trials if WORKER_ATTR in t.user_attrs)
        best = shared.study.best_trial if counts[TrialState.COMPLETE] else None
        left = counts[TrialState.RUNNING] + counts[TrialState.WAITING]
        table.add_row(
            shared.attrs[METHOD_ATTR],
            f"{counts[TrialState.COMPLETE]}/{counts[TrialState.PRUNED]}/{counts[TrialState.FAIL]}/{left}",
            "-" if best is None else f"{best.value:.4f} (#{best.number})",
            "-" if best is None else format_params(best.params),
            ", ".join(f"{w}: {n}" for w, n in sorted(workers.items())),
        )
    return table


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
