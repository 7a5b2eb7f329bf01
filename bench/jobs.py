"""One claimed trial of a shared study: train it, and record how it ended in the study."""

from __future__ import annotations

import traceback
from collections.abc import Callable

from optuna.trial import TrialState
from rich.console import Console

from bench.signals import interruption_reason
from bench.studies import Claim, SharedStudy, finish_trial
from bench.train import RunResult, StopTraining


def run_claimed(
    shared: SharedStudy, claim: Claim, console: Console, train: Callable[[], RunResult]
) -> tuple[TrialState, RunResult | None]:
    """Call ``train`` for a claimed trial and end the trial by its outcome.

    A finished run: COMPLETE, its value the run's best validation value. A run stopped early
    (:class:`~bench.train.StopTraining`, e.g. pruned): PRUNED. A run that diverged or raised:
    FAIL with the reason, and the next trial goes on. Ctrl-C or SIGTERM: FAIL, the trial queued
    again to continue later, and the interrupt propagates. Returns the final state and the result.
    """
    name = f"{shared.name} trial {claim.frozen.number}"
    try:
        result = train()
    except StopTraining as stop:
        finish_trial(shared, claim, state=TrialState.PRUNED)
        console.print(f"{name}: {stop}")
        return TrialState.PRUNED, None
    except KeyboardInterrupt as interrupt:
        finish_trial(shared, claim, state=TrialState.FAIL, failure=interruption_reason(interrupt), retry=True)
        raise
    except Exception as error:
        console.print(f"[red]{name} failed:[/]\n{traceback.format_exc()}")
        finish_trial(shared, claim, state=TrialState.FAIL, failure=f"{type(error).__name__}: {error}")
        return TrialState.FAIL, None
    if result.status == "FINISHED" and result.best_val is not None:
        finish_trial(shared, claim, value=result.best_val)
        return TrialState.COMPLETE, result
    finish_trial(shared, claim, state=TrialState.FAIL, failure=result.reason or result.status)
    return TrialState.FAIL, result
