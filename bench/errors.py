"""How the commands report bad input: one red line that says what is wrong and what to do, exit code 2."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

from bench.credentials import masked

INPUT_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, FileNotFoundError, ConnectionError)
"""What a command reports as bad input rather than as a crash: an invalid option or value, missing
data or a missing package (named in the message with the fix), an unreachable store or server."""

INPUT_ERROR_EXIT_CODE = 2


def print_error(console: Console, error: Exception | str) -> int:
    """Print ``error`` as one ``error:`` line, its text shown as written; return the exit code 2.

    The text is escaped, so brackets in it (``pip install -e ".[chestmnist]"``) are printed
    rather than read as rich markup; a password in a URL in it is hidden (:func:`~bench.credentials.masked`).
    """
    console.print(f"[red]error:[/] {escape(masked(str(error)))}")
    return INPUT_ERROR_EXIT_CODE
