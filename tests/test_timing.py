"""Phase timing and peak memory of :class:`bench.timing.PhaseTimer` on the CPU."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.timing import PhaseTimer


def test_phases_are_exclusive_and_add_up_to_the_step() -> None:
    timer = PhaseTimer(torch.device("cpu"))
    with timer("forward"):
        time.sleep(0.02)
        with timer("gradients"):
            time.sleep(0.05)
    timer.step()
    timing = timer.epoch()
    assert timing.steps == 1
    assert timing.ms_per_step["gradients"] == pytest.approx(50, abs=15)
    assert timing.ms_per_step["forward"] == pytest.approx(20, abs=15)
    assert timing.step_ms == pytest.approx(timing.ms_per_step["forward"] + timing.ms_per_step["gradients"])


PEAK_SCRIPT = """
import torch
from bench.timing import PhaseTimer
timer = PhaseTimer(torch.device("cpu"))
with timer("gradients"):
    buffer = torch.ones(64 * 2**20 // 4)  # 64 MB, touched, freed before the phase ends
    del buffer
timer.step()
first = timer.epoch().peak_memory_increase_mb
with timer("gradients"):  # the next epoch starts from a fresh mark
    pass
timer.step()
print(first, timer.epoch().peak_memory_increase_mb)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's peak-RSS mark is Linux's")
def test_a_buffer_freed_inside_a_phase_counts_in_the_peak() -> None:
    # a fresh process: in this one, freed heap memory may be reused without any rise in RSS
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    first, second = map(float, result.stdout.split())
    assert first >= 60 and second < 60
