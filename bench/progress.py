"""Training progress a person can follow, on a terminal and in a log file alike.

On a terminal, tqdm draws bars (on standard error): the sweep (runs over, of all, and its
ETA), the run's epochs and the epoch's steps. When standard output is not a terminal
(``nohup``, SLURM, a worker's log), every epoch prints one line to it::

    run 2 of 6: pcgrad seed 1, epoch 3/10, val mean_auroc 0.7123, 45 ms/step, ETA run 0:02:10, sweep 0:25:40

The times left are estimates from the pace measured here (seconds per epoch, validation
included, over every epoch this process trained in the sweep): the run's epochs left, plus
every epoch of the runs not started yet, shared among the runs training at once.
"""

from __future__ import annotations

import datetime
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from tqdm.auto import tqdm

Item = TypeVar("Item")


def duration(seconds: float) -> str:
    """``H:MM:SS``, rounded to the second."""
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


def log_lines_wanted() -> bool:
    """Whether progress is printed as one line per epoch: when standard output is not a terminal."""
    return not sys.stdout.isatty()


@dataclass
class Sweep:
    """Where a sweep stands, for progress output.

    ``runs`` in all; ``position`` of them have started, the one training now included (runs
    reused from MLflow count too); ``parallel`` runs train at once (the workers of a shared
    grid). The pace is measured over the epochs trained here.
    """

    runs: int
    position: int = 1
    parallel: int = 1
    epochs_trained: int = 0
    seconds_training: float = 0.0
    bar: tqdm | None = field(default=None, repr=False)

    @classmethod
    def with_bar(cls, runs: int) -> Sweep:
        """A sweep of ``runs`` with its own tqdm bar (drawn only on a terminal)."""
        return cls(runs, bar=tqdm(total=runs, desc="sweep", unit="run", disable=None))

    def run_over(self) -> None:
        """Count the current run as over and move on to the next."""
        self.position += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        """Close the sweep's bar."""
        if self.bar is not None:
            self.bar.close()

    def seconds_left(self, run_epochs_left: int, epochs: int, seconds_per_epoch: float) -> float:
        """The run's epochs left plus ``epochs`` for every run not started, at the given pace."""
        waiting = max(self.runs - self.position, 0)
        return seconds_per_epoch * (run_epochs_left + waiting * epochs / max(self.parallel, 1))


class RunProgress:
    """The progress of one run's epochs: a tqdm bar, and a line per epoch when the output is
    not a terminal (:func:`log_lines_wanted`)."""

    def __init__(self, method: str, seed: int, metric: str, epochs: int, epochs_done: int, sweep: Sweep | None) -> None:
        self.label = f"{method} seed {seed}"
        self.metric, self.epochs, self.sweep = metric, epochs, sweep
        self.print_lines = log_lines_wanted()
        self.bar = tqdm(total=epochs, initial=epochs_done, desc=self.label, unit="epoch", disable=None)
        self.epochs_trained = 0
        self.started = time.perf_counter()

    def steps(self, batches: Iterable[Item], epoch: int) -> Iterator[Item]:
        """An iterator over ``batches`` that draws the (transient) bar of epoch ``epoch``'s steps."""
        return iter(tqdm(batches, desc=f"epoch {epoch}", leave=False, unit="step", disable=None))

    def epoch_done(self, epoch: int, value: float, step_ms: float) -> None:
        """Report epoch ``epoch`` (1-based) with the validation ``value`` and its ms per step."""
        self.epochs_trained += 1
        seconds = time.perf_counter() - self.started
        run_pace = seconds / self.epochs_trained
        run_left = run_pace * (self.epochs - epoch)
        self.bar.update(1)
        self.bar.set_postfix({self.metric: f"{value:.4f}", "ms/step": f"{step_ms:.0f}"})
        line = (
            f"{self.label}, epoch {epoch}/{self.epochs}, val {self.metric} {value:.4f}, "
            f"{step_ms:.0f} ms/step, ETA run {duration(run_left)}"
        )
        if self.sweep is not None:
            sweep_pace = (self.sweep.seconds_training + seconds) / (self.sweep.epochs_trained + self.epochs_trained)
            sweep_left = duration(self.sweep.seconds_left(self.epochs - epoch, self.epochs, sweep_pace))
            line = f"run {self.sweep.position} of {self.sweep.runs}: {line}, sweep {sweep_left}"
            if self.sweep.bar is not None:
                self.sweep.bar.set_postfix_str(f"run {self.sweep.position} of {self.sweep.runs}, ETA {sweep_left}")
        if self.print_lines:
            tqdm.write(line, file=sys.stdout)

    def close(self) -> None:
        """Close the bar; add this run's epochs and time to the sweep's pace."""
        self.bar.close()
        if self.sweep is not None:
            self.sweep.epochs_trained += self.epochs_trained
            self.sweep.seconds_training += time.perf_counter() - self.started
