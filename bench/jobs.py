"""One claimed trial of a shared study: train it, and record how it ended in the study."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from rich.console import Console

from bench.credentials import masked
from bench.studies import GRACE_HEARTBEATS, Claim, SharedStudy, finish_trial, holds_claim
from bench.train import RunResult, RunTakenOver, StopTraining

ClaimCheck = Callable[[], None]
"""Raises :class:`~bench.train.RunTakenOver` when the claimed trial is no longer this worker's."""


@dataclass(frozen=True)
class ClaimOutcome:
    """How a claimed trial ended: its final state, the run's result (none when the run was
    stopped early or raised), why it did not complete, and the seconds it took."""

    state: TrialState
    result: RunResult | None
    reason: str | None
    seconds: float


def claim_check(shared: SharedStudy, claim: Claim) -> ClaimCheck:
    """A check to call before writing anything for ``claim``'s trial (:func:`~bench.studies.holds_claim`)."""

    def check() -> None:
        if not holds_claim(shared, claim):
            raise RunTakenOver(
                f"another worker took {shared.name} trial {claim.frozen.number} over: this worker sent no heartbeat "
                f"for {GRACE_HEARTBEATS} heartbeats (it was paused or stalled); stopped without writing"
            )

    return check


def run_claimed(
    shared: SharedStudy, claim: Claim, console: Console, train: Callable[[ClaimCheck], RunResult]
) -> ClaimOutcome:
    """Call ``train(check)`` for a claimed trial and end the trial by its outcome; ``check``
    (:func:`claim_check`) is for ``train`` to call before each of its writes.

    A finished run: COMPLETE, its value the run's best validation value. A run stopped early
    (:class:`~bench.train.StopTraining`, e.g. pruned): PRUNED. A run that diverged or raised:
    FAIL with the reason, and the next trial goes on. A trial another worker took over
    (:class:`~bench.train.RunTakenOver`): left to that worker, in the state it has. Ctrl-C or
    SIGTERM propagate (:func:`bench.worker.work` queues the trial again).
    """
    name = f"{shared.name} trial {claim.frozen.number}"
    started = time.perf_counter()

    def ended(state: TrialState, result: RunResult | None, reason: str | None) -> ClaimOutcome:
        return ClaimOutcome(state, result, reason, time.perf_counter() - started)

    try:
        result = train(claim_check(shared, claim))
    except StopTraining as stop:
        finish_trial(shared, claim, state=TrialState.PRUNED)
        return ended(TrialState.PRUNED, None, str(stop))
    except (RunTakenOver, UpdateFinishedTrialError) as lost:
        reason = str(lost) if isinstance(lost, RunTakenOver) else f"another worker ended {name}: {lost}"
        console.print(f"[yellow]{reason}[/]")
        return ended(shared.storage.get_trial(claim.trial_id).state, None, reason)
    except Exception as error:
        console.print(f"[red]{name} failed:[/]\n{masked(traceback.format_exc())}")
        reason = masked(f"{type(error).__name__}: {error}")
        finish_trial(shared, claim, state=TrialState.FAIL, failure=reason)
        return ended(TrialState.FAIL, None, reason)
    if result.status == "FINISHED" and result.best_val is not None:
        finish_trial(shared, claim, value=result.best_val)
        return ended(TrialState.COMPLETE, result, None)
    reason = result.reason or result.status
    finish_trial(shared, claim, state=TrialState.FAIL, failure=reason)
    return ended(TrialState.FAIL, result, reason)
