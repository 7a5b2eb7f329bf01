"""A ``bench run`` grid shared through an Optuna storage: each (method, seed) cell trains once.

    python -m bench run --methods all --task cxr14 --seeds 0,1,2 --storage postgresql://... [--workers K]

The grid is a study ``grid/<task>/<hash>`` (the hash: the run spec without where results go,
and the tuned settings with ``--tuned``); each cell is one of its trials, queued up front and
claimed exactly once by the workers (:mod:`bench.studies`). A finished cell keeps its
:class:`~bench.train.RunResult` as the trial's ``result`` attribute, so whoever finishes the
grid writes the summary of all cells. Run again, the command queues only the cells that
have not completed (a crashed cell, one whose retries ran out) and trains nothing else.

A cell still WAITING or RUNNING when the command ends (held by a worker on another machine,
which a journal file cannot judge from here) is KILLED in the summary, with the reason,
and :func:`undone_message` says what to do; the command then exits 1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

from optuna.trial import FrozenTrial, TrialState

import tasks
from bench.credentials import masked
from bench.jobs import ClaimCheck, run_claimed
from bench.progress import Sweep
from bench.spec import RunSpec
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
)
from bench.tracking import TUNED_FROM_TAG, Tracker
from bench.train import RunResult, train_run
from bench.tune import TunedSetting, tuned_spec

if TYPE_CHECKING:
    from bench.worker import WorkerContext

TUNED_ATTR = "tuned"
RESULT_ATTR = "result"
"""Trial user attribute: the cell's :class:`RunResult` as a mapping."""
OPEN_STATES = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
"""A cell with a trial in one of these states is not queued again."""


def cell_spec(spec: RunSpec, method: str, tuned: Mapping[str, TunedSetting]) -> RunSpec:
    """The spec a cell trains with: ``spec``, with ``method``'s tuned settings if any."""
    setting = tuned.get(method)
    return spec if setting is None else tuned_spec(spec, method, setting.params)


def prepare_grid(
    url: str, spec: RunSpec, suite: tasks.TaskSuite, tuned: Mapping[str, TunedSetting], heartbeat: int
) -> SharedStudy:
    """Create (or load) the grid's study and queue every cell that has no open trial."""
    config = {k: v for k, v in spec.to_dict().items() if k not in WHERE_KEYS}
    tuned_attr = {m: dataclasses.asdict(s) for m, s in tuned.items()}
    digest = hashlib.sha256(json.dumps([config, tuned_attr], sort_keys=True, default=str).encode()).hexdigest()
    identity = {CONFIG_ATTR: config, TUNED_ATTR: tuned_attr, KIND_ATTR: "grid"}
    name = f"grid/{spec.task}/{digest[:12]}"
    shared = create_shared_study(url, name, suite.primary_direction, identity, {SPEC_ATTR: spec.to_dict()}, heartbeat)
    open_cells = {
        (t.user_attrs["method"], t.user_attrs["seed"])
        for t in shared.study.get_trials(deepcopy=False, states=OPEN_STATES)
    }
    add_waiting_trials(
        shared,
        [{"method": m, "seed": s} for m in spec.methods for s in spec.seeds if (m, s) not in open_cells],
    )
    return shared


def run_grid_cell(shared: SharedStudy, claim: Claim, context: WorkerContext) -> str:
    """Train one claimed cell; keep its result on the trial; return the trial's final state name."""
    method, seed = claim.frozen.user_attrs["method"], claim.frozen.user_attrs["seed"]
    spec = context.spec(shared)
    tuned = {m: TunedSetting(**s) for m, s in shared.attrs.get(TUNED_ATTR, {}).items()}
    context.console.print(f"{shared.name}: {method} seed {seed}")
    sweep = grid_sweep(shared)

    def train(check: ClaimCheck) -> RunResult:
        with Tracker(spec.tracking_uri, spec.task, spec.results) as tracker:
            result = train_run(
                cell_spec(spec, method, tuned), context.suite(spec), method, seed, tracker,
                tags=tuned_tags(tuned, method), before_writes=check, sweep=sweep,
            )
        check()
        kept = dataclasses.replace(result, reason=None if result.reason is None else masked(result.reason))
        shared.storage.set_trial_user_attr(claim.trial_id, RESULT_ATTR, dataclasses.asdict(kept))
        return result

    outcome = run_claimed(shared, claim, context.console, train)
    reason = "" if outcome.reason is None else f": {outcome.reason}"
    context.console.print(
        f"{shared.name}: {method} seed {seed} {outcome.state.name} after {outcome.seconds:.1f} s{reason}"
    )
    return outcome.state.name


def tuned_tags(tuned: Mapping[str, TunedSetting], method: str) -> dict[str, str]:
    """MLflow tags naming the tuning trial whose settings a run uses."""
    setting = tuned.get(method)
    return {} if setting is None else {TUNED_FROM_TAG: f"{setting.study} trial {setting.trial}"}


def _latest_trials(shared: SharedStudy) -> dict[tuple[str, int], FrozenTrial]:
    """The latest trial of each (method, seed) cell (a retry replaces the trial it retries)."""
    latest: dict[tuple[str, int], FrozenTrial] = {}
    for trial in shared.study.get_trials(deepcopy=False):
        latest[(trial.user_attrs["method"], trial.user_attrs["seed"])] = trial
    return latest


def grid_sweep(shared: SharedStudy) -> Sweep:
    """The grid as a :class:`~bench.progress.Sweep` for a cell just claimed: every cell not
    waiting has started (this one included); the running ones train at once."""
    states = [trial.state for trial in _latest_trials(shared).values()]
    running = sum(state == TrialState.RUNNING for state in states)
    waiting = sum(state == TrialState.WAITING for state in states)
    return Sweep(len(states), position=len(states) - waiting, parallel=max(running, 1))


def grid_results(shared: SharedStudy, spec: RunSpec) -> list[RunResult]:
    """One result per cell, in the spec's order: the latest trial's kept result, else why not."""
    latest = _latest_trials(shared)
    results = []
    for method in spec.methods:
        for seed in spec.seeds:
            trial = latest.get((method, seed))
            if trial is None:
                results.append(RunResult(method, seed, "KILLED", reason="not run"))
            elif RESULT_ATTR in trial.user_attrs:
                results.append(RunResult(**trial.user_attrs[RESULT_ATTR]))
            elif not trial.state.is_finished():
                holder = trial.user_attrs.get(WORKER_ATTR, "not recorded")
                claimed = f", claimed by worker {holder}" if trial.state == TrialState.RUNNING else ""
                results.append(RunResult(method, seed, "KILLED", reason=f"not done: still {trial.state.name}{claimed}"))
            else:
                crashed = trial.state == TrialState.FAIL
                status = "FAILED" if crashed else "KILLED"
                reason = trial.user_attrs.get(FAILURE_ATTR, trial.state.name)
                results.append(RunResult(method, seed, status, reason=reason, crashed=crashed))
    return results


def undone_message(results: list[RunResult], url: str) -> str | None:
    """What to do about the cells of ``results`` that are not done (KILLED: not run, or still
    waiting or running elsewhere); ``None`` when every cell is done."""
    undone = [r for r in results if r.status == "KILLED"]
    if not undone:
        return None
    cells = "; ".join(f"{r.method} seed {r.seed} ({r.reason})" for r in undone)
    return (
        f"{len(undone)} cell(s) not done: {cells}. Run the same command again to train them. A cell "
        "claimed by a worker on another machine is that worker's: once it has ended, run "
        f"`python -m bench worker --storage {masked(url)}` on that machine (it retries the claims of "
        "its dead processes), or use a database storage, whose heartbeat lets any worker retry them"
    )
