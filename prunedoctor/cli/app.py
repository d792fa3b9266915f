"""The ``prunedoctor`` Typer application.

Each command lives in its own module and registers itself on :data:`app`.
Command modules import torch, timm and the library inside the command
function, so that ``prunedoctor --help`` stays well under half a second.
"""

from __future__ import annotations

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


def main() -> None:
    """Entry point of the ``prunedoctor`` console script."""
    import sys

    # Typer/click exit with 2 on usage errors already; keep that contract.
    app(prog_name="prunedoctor", args=sys.argv[1:])
