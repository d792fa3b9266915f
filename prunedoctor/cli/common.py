"""Helpers shared by the commands: consoles, error mapping, logging setup."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from prunedoctor.errors import PrunedoctorError

__all__ = ["stdout_console", "stderr_console", "handle_errors", "fail", "setup_logging"]

F = TypeVar("F", bound=Callable[..., Any])

stdout_console = Console(highlight=False)
stderr_console = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``prunedoctor: error: MESSAGE`` as one line on stderr and return the Exit to raise."""
    # Written with print, not rich, so that long paths are never wrapped and
    # the message stays one line for scripts that read stderr.
    print(f"prunedoctor: error: {message}", file=sys.stderr, flush=True)
    return typer.Exit(code)


def handle_errors(func: F) -> F:
    """Map :class:`PrunedoctorError` raised by a command to one stderr line and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PrunedoctorError as error:
            raise fail(str(error), error.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None

    return wrapper  # type: ignore[return-value]


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Send the library's log records to stderr through rich, markup off."""
    from rich.logging import RichHandler

    level = logging.INFO
    if verbose:
        level = logging.DEBUG
    elif quiet:
        level = logging.WARNING
    handler = RichHandler(console=stderr_console, markup=False, show_path=False, show_time=False)
    logger = logging.getLogger("prunedoctor")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
