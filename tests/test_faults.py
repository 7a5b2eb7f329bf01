"""Faults injected into the harness, and what it guarantees after each (the table: docs/faults.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bench.cli import main
from bench.results_io import PREDICTIONS_ARTIFACT
from bench.tracking import Tracker, experiment_name

# --- Leftovers (issue 14, item 10): temporary checkpoint files, a resumed final phase -----------

LEFTOVER_TASK = "cxr14-synthetic"
LEFTOVER_RUN = [
    "run", "--methods", "ew", "--task", LEFTOVER_TASK, "--task-opt", "n_images=140", "--task-opt", "min_positives=1",
    "--image-size", "16", "--batch-size", "64", "--epochs", "1", "--device", "cpu", "--no-checkpoint",
]
"""One method, one epoch of one training step: the run ends in seconds."""


@pytest.fixture
def interrupted_in_final_phase(results: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run :data:`LEFTOVER_RUN` into ``results`` and press Ctrl-C after its test metrics are
    logged, while its test predictions are written; return the run key (its checkpoint stays)."""
    log_artifact = Tracker.log_artifact

    def interrupt_at_the_predictions(tracker: Tracker, path: Path) -> None:
        if path.name == PREDICTIONS_ARTIFACT:
            raise KeyboardInterrupt
        log_artifact(tracker, path)

    with monkeypatch.context() as patch:
        patch.setattr(Tracker, "log_artifact", interrupt_at_the_predictions)
        assert main([*LEFTOVER_RUN, "--results", str(results)]) == 130
    (checkpoint,) = (results / "checkpoints").glob("*.pt")
    return checkpoint.stem


def final_phase_histories(results: Path) -> dict[str, int]:
    """Number of values logged for each ``summary/*`` and ``test/*`` metric of the one run."""
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(experiment_name(LEFTOVER_TASK))
    (run,) = client.search_runs([experiment.experiment_id])
    return {
        key: len(client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
        if key.startswith(("summary/", "test/"))
    }


def test_a_resumed_final_phase_logs_each_summary_and_test_metric_once(
    results: Path, interrupted_in_final_phase: str
) -> None:
    before = final_phase_histories(results)
    assert "test/mean_auroc" in before and "summary/step_ms" in before
    assert main([*LEFTOVER_RUN, "--results", str(results)]) == 0
    after = final_phase_histories(results)
    assert set(after) >= set(before)
    assert after == dict.fromkeys(after, 1)


def test_stale_temporary_checkpoints_of_the_run_are_removed_when_it_resumes_and_no_others(
    results: Path, interrupted_in_final_phase: str
) -> None:
    checkpoints = results / "checkpoints"
    stale = checkpoints / f".{interrupted_in_final_phase}.pt.k1ll3d0.tmp"  # as a write killed mid-way leaves it
    other = checkpoints / f".{LEFTOVER_TASK}_ew_seed1_0123456789abcdef.pt.w0rk1ng.tmp"  # another run writing now
    for path in (stale, other):
        path.write_bytes(b"partial")
    assert main([*LEFTOVER_RUN, "--results", str(results)]) == 0
    assert not stale.exists()
    assert other.read_bytes() == b"partial"
