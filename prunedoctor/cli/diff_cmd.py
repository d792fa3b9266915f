"""The ``prunedoctor diff`` command: compare two checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from prunedoctor.cli.app import app
from prunedoctor.cli.common import handle_errors, setup_logging, stdout_console


@app.command("diff", no_args_is_help=True)
@handle_errors
def diff_command(
    a: Annotated[Path, typer.Argument(help="First checkpoint (A).")],
    b: Annotated[Path, typer.Argument(help="Second checkpoint (B).")],
    atol: Annotated[float, typer.Option(help="Absolute tolerance for values, in weight units.", min=0.0)] = 0.0,
    rtol: Annotated[float, typer.Option(help="Relative tolerance for values, as a fraction of |B|.", min=0.0)] = 0.0,
    raw: Annotated[
        bool, typer.Option("--raw", help="Compare the keys as stored instead of the effective weights (orig * mask).")
    ] = False,
    heads: Annotated[Optional[int], typer.Option(help="Head count per block, for the head comparison.", min=1)] = None,
    model: Annotated[Optional[str], typer.Option(help="timm model name to take the head count from.")] = None,
    select: Annotated[Optional[str], typer.Option(help="Key path of the state dict inside both files.")] = None,
    unsafe_load: Annotated[
        bool, typer.Option("--unsafe-load", help="Load pickles that need globals outside the allowlist (runs code).")
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing; the exit code is the result.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details on stderr.")] = False,
) -> None:
    """Compare two checkpoints: keys, shapes, values, masks, heads and neurons, sparsity.

    Exit codes: 0 equal within tolerance, 1 different, 2 bad input.
    """
    from prunedoctor.diff import diff_state_dicts
    from prunedoctor.loading import load_checkpoint

    setup_logging(verbose, quiet)
    first = load_checkpoint(a, select=select, unsafe_load=unsafe_load)
    second = load_checkpoint(b, select=select, unsafe_load=unsafe_load)
    report = diff_state_dicts(
        first.state_dict,
        second.state_dict,
        raw=raw,
        atol=atol,
        rtol=rtol,
        heads=heads,
        model_name=model,
        args_a=first.args,
        args_b=second.args,
    )
    report = {"a": str(a), "b": str(b), **report}
    if json_output:
        typer.echo(json.dumps(report, indent=2))
    elif not quiet:
        from prunedoctor.cli.render_vit import render_diff_report

        render_diff_report(stdout_console, report)
    if not report["equal"]:
        raise typer.Exit(1)
