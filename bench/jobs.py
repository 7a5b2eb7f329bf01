"""One claimed trial of a shared study: train it, and record how it ended in the study."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from optuna.trial import TrialState
from rich.console import Console

from bench.credentials import masked
from bench.signals import interruption_reason
from bench.studies import Claim, SharedStudy, finish_trial
from bench.train import RunResult, StopTraining


@dataclass(frozen=True)
class ClaimOutcome:
    """How a claimed trial ended: its final state, the run's result (none when the run was
    stopped early or raised), why it did not complete, and the seconds it took."""

    state: TrialState
    result: RunResult | None
    reason: str | None
    seconds: float


def run_claimed(
    shared: SharedStudy, claim: Claim, console: Console, train: Callable[[], RunResult]
) -> ClaimOutcome:
    """Call ``train`` for a claimed trial and end the trial by its outcome.

    A finished run: COMPLETE, its value the run's best validation value. A run stopped early
    (:class:`~bench.train.StopTraining`, e.g. pruned): PRUNED. A run that diverged or raised:
    FAIL with the reason, and the next trial goes on. Ctrl-C or SIGTERM: FAIL, the trial queued
    again to continue later, and the interrupt propagates.
    """
    name = f"{shared.name} trial {claim.frozen.number}"
    started = time.perf_counter()

    def ended(state: TrialState, result: RunResult | None, reason: str | None) -> ClaimOutcome:
        return ClaimOutcome(state, result, reason, time.perf_counter() - started)

    try:
        result = train()
    except StopTraining as stop:
        finish_trial(shared, claim, state=TrialState.PRUNED)
        return ended(TrialState.PRUNED, None, str(stop))
    except KeyboardInterrupt as interrupt:
        finish_trial(shared, claim, state=TrialState.FAIL, failure=interruption_reason(interrupt), retry=True)
        raise
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
