"""The ``prunedoctor`` Typer application.

Each command lives in its own module and registers itself on :data:`app`.
Command modules import torch, timm and the library inside the command
function, so that ``prunedoctor --help`` stays well under half a second.
"""

from __future__ import annotations

from types import ModuleType
from typing import Annotated, Optional

import typer

from prunedoctor import __version__

app = typer.Typer(
    name="prunedoctor",
    help=(
        "Inspect, normalize, check, diff and re-run the pruning of Vision Transformer "
        "checkpoints made with torch.nn.utils.prune.\n\n"
        "Exit codes: 0 success, 1 a check or comparison failed, 2 bad input or usage."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"prunedoctor {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Inspect, normalize, check, diff and re-run the pruning of ViT checkpoints."""


def _register_commands() -> None:
    # Imported for their side effect: each module adds its command to ``app``.
    from prunedoctor.cli import (  # noqa: F401
        check_cmd,
        diff_cmd,
        inspect_cmd,
        normalize_cmd,
        prune_cmd,
        reproduce_cmd,
    )


_register_commands()


def _click_exception_modules() -> list[ModuleType]:
    """Return the exception modules of click and of the click copy that typer 0.29 and newer vendor."""
    import importlib

    modules = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            continue
    return modules


def main() -> None:
    """Entry point of the ``prunedoctor`` console script.

    Usage errors (an unknown option, a value out of range, a missing
    argument) become one line on stderr and exit code 2, like every other
    bad input, instead of a multi-line box.
    """
    import sys

    modules = _click_exception_modules()
    no_args = tuple(m.NoArgsIsHelpError for m in modules if hasattr(m, "NoArgsIsHelpError"))
    usage_errors = tuple(m.UsageError for m in modules)
    aborts = (typer.Abort, KeyboardInterrupt) + tuple(m.Abort for m in modules if hasattr(m, "Abort"))
    try:
        result = app(prog_name="prunedoctor", args=sys.argv[1:], standalone_mode=False)
    except no_args as error:
        # Its message is the help text of the command that was run without arguments.
        print(error.format_message(), file=sys.stderr)
        sys.exit(2)
    except usage_errors as error:
        context = getattr(error, "ctx", None)
        command = context.command_path if context is not None else "prunedoctor"
        message = " ".join(error.format_message().split()).replace("Value error, ", "")
        print(f"prunedoctor: error: {message} (see '{command} --help')", file=sys.stderr)
        sys.exit(2)
    except aborts:
        print("prunedoctor: error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)
