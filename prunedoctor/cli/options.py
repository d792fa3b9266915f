"""Options and output helpers shared by the inspect, normalize and check commands."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Optional

import typer

from prunedoctor.cli.common import stderr_console

__all__ = [
    "QuietOption",
    "SelectOption",
    "UnsafeLoadOption",
    "VerboseOption",
    "analysis_progress",
    "print_json",
]

SelectOption = Annotated[
    Optional[str],
    typer.Option(
        "--select",
        metavar="KEY",
        help="Key path of the state dict inside the file, '/'-separated (for example state_dict_ema); "
        "by default the live model's weights are chosen and the other candidates are listed.",
    ),
]
UnsafeLoadOption = Annotated[
    bool,
    typer.Option(
        "--unsafe-load",
        help="Load a pickle that needs globals outside the safe allowlist with weights_only=False. "
        "Only for files you trust: code in the file can run.",
    ),
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Print no progress and no log messages below warnings.")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Print debug log messages on stderr.")]


def print_json(value: Any) -> None:
    """Write ``value`` as indented JSON to stdout, without rich highlighting or wrapping."""
    sys.stdout.write(json.dumps(value, indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


@contextmanager
def analysis_progress(quiet: bool, description: str) -> Iterator[Callable[[int, int], None] | None]:
    """Yield a ``progress(done, total)`` callback that drives a rich bar on stderr, or None.

    The bar is shown only when stderr is a terminal and ``quiet`` is false,
    so redirected output and ``--quiet`` stay clean. It disappears when done.
    """
    if quiet or not stderr_console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr_console, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
