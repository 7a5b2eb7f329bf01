"""SIGTERM handled like Ctrl-C, so that a terminated command leaves its runs resumable.

A time limit (``timeout``), SLURM's preemption and ``kill`` send SIGTERM. By default Python
dies on it at once, leaving the MLflow run RUNNING. Within :func:`sigterm_as_interrupt` the
signal raises :class:`Terminated`, a :class:`KeyboardInterrupt`, so everything that handles
Ctrl-C handles it the same way: the run ends KILLED, its epoch checkpoint stays, the trial
of a shared study is queued again, and the command exits with ``128 + 15 = 143``.

Within :func:`interrupts_held` neither signal interrupts: a write that must not be cut in
half (an epoch checkpoint, the claim of a trial) finishes first, and the clean-up after an
interrupt (the run ended KILLED, the trial queued again) is not cut by a second one.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

CTRL_C_EXIT_CODE = 128 + signal.SIGINT
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Raise :class:`Terminated` on SIGTERM inside the block.

    Once it is raised, further SIGTERMs are ignored until the block ends, so that the run is
    recorded as KILLED before the process exits; SIGKILL still ends it at once. Only the main
    thread can handle signals: in another thread the block changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated(f"terminated by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


INTERRUPTS = (signal.SIGINT, signal.SIGTERM)
"""The signals :func:`interrupts_held` holds back: Ctrl-C and SIGTERM."""


@contextmanager
def interrupts_held(*, deliver: bool = True) -> Iterator[None]:
    """Hold SIGINT and SIGTERM back inside the block.

    On leaving it, the first signal held back is delivered to the handler that was in place
    (Ctrl-C then raises :class:`KeyboardInterrupt`, SIGTERM :class:`Terminated`), or, with
    ``deliver=False``, dropped: that is for the clean-up after an interrupt, which is being
    handled already. Only the main thread can handle signals: in another thread the block
    changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append(signum)

    previous: dict[signal.Signals, Any] = {signum: signal.signal(signum, hold) for signum in INTERRUPTS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if held and deliver:  # also when the block raised: the interrupt is what the user asked for
            signal.raise_signal(held[0])


def interruption_reason(interrupt: KeyboardInterrupt) -> str:
    """Why a run was interrupted, as its MLflow ``failure_reason`` says it."""
    return "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted (Ctrl-C)"


def interruption_exit_code(interrupt: KeyboardInterrupt) -> int:
    """The exit code of a command ended by ``interrupt``: 143 for SIGTERM, 130 for Ctrl-C."""
    return SIGTERM_EXIT_CODE if isinstance(interrupt, Terminated) else CTRL_C_EXIT_CODE


def interruption_signal(interrupt: KeyboardInterrupt) -> signal.Signals:
    """The signal to pass ``interrupt`` on to child processes: SIGTERM or SIGINT."""
    return signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT
