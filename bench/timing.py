"""Per-phase step timing and peak memory.

Phases are exclusive: entering a phase inside another pauses the outer one, so the phases of a
step add up to the step. On a GPU each boundary records a CUDA event and the durations are read
once per epoch (one synchronisation per epoch, none inside a step); on a CPU each boundary
reads the monotonic clock (``time.perf_counter_ns``).

Peak memory: on a GPU, the device allocator's peak (``torch.cuda.max_memory_allocated``), reset
at each epoch; on a CPU, the process's peak resident set size (RSS): on Linux the kernel's own
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` when the timer is created
and at each epoch), so a buffer that lives only inside a phase is counted; elsewhere the RSS
sampled at every phase boundary. It is reported both as a peak and as the peak's increase over
the RSS when the timer was created.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil
import torch

STEP_PHASES = ("forward", "gradients", "weighting", "optimizer")
"""Phases that make up a training step; ``data`` (waiting for the batch) is timed apart."""


@dataclass(frozen=True)
class EpochTiming:
    """Mean milliseconds per step for each phase and the peak memory of one epoch."""

    ms_per_step: dict[str, float]
    steps: int
    peak_memory_mb: float
    peak_memory_increase_mb: float

    @property
    def step_ms(self) -> float:
        """Mean milliseconds of a whole step (the sum of ``STEP_PHASES``)."""
        return sum(self.ms_per_step.get(p, 0.0) for p in STEP_PHASES)


class PhaseTimer:
    """Exclusive phase timer; use ``with timer("forward"): ...`` and call :meth:`step`."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self._process = psutil.Process()
        self._baseline_rss = self._process.memory_info().rss
        self._open: list[str] = []
        self._segments: list[tuple[str, object, object]] = []
        self._segment_start: object = None
        self._steps = 0
        self._peak_rss = self._baseline_rss
        self._kernel_peak = not self.cuda and _reset_peak_rss()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
            self._baseline_cuda = torch.cuda.memory_allocated(device)

    def _mark(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        self._peak_rss = max(self._peak_rss, self._process.memory_info().rss)
        return time.perf_counter_ns()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        mark = self._mark()
        if self._open:
            self._segments.append((self._open[-1], self._segment_start, mark))
        self._open.append(phase)
        self._segment_start = mark
        try:
            yield
        finally:
            end = self._mark()
            self._segments.append((self._open.pop(), self._segment_start, end))
            self._segment_start = end

    def step(self) -> None:
        """Count one finished training step."""
        self._steps += 1

    def epoch(self) -> EpochTiming:
        """Summarise the steps since the last call and start a new epoch."""
        totals: dict[str, float] = defaultdict(float)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for phase, start, end in self._segments:
            if self.cuda:
                totals[phase] += start.elapsed_time(end)  # type: ignore[attr-defined]
            else:
                totals[phase] += (end - start) / 1e6  # type: ignore[operator]
        steps = max(self._steps, 1)
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            baseline = self._baseline_cuda
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            peak, baseline = self._peak_rss, self._baseline_rss
            if self._kernel_peak:
                peak = max(peak, _kernel_peak_rss())
                _reset_peak_rss()
            self._peak_rss = self._process.memory_info().rss
        timing = EpochTiming(
            ms_per_step={phase: total / steps for phase, total in totals.items()},
            steps=self._steps,
            peak_memory_mb=peak / 2**20,
            peak_memory_increase_mb=max(peak - baseline, 0) / 2**20,
        )
        self._segments.clear()
        self._steps = 0
        return timing


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _kernel_peak_rss() -> int:
    """The kernel's peak resident set size of this process in bytes (``VmHWM``), 0 if unreadable."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
