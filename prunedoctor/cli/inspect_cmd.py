"""The ``prunedoctor inspect`` command: what is in a checkpoint and what is wrong with it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from prunedoctor.cli.app import app
from prunedoctor.cli.common import handle_errors, setup_logging, stdout_console
from prunedoctor.cli.options import (
    QuietOption,
    SelectOption,
    UnsafeLoadOption,
    VerboseOption,
    analysis_progress,
    print_json,
)


@app.command("inspect")
@handle_errors
def inspect_command(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="Checkpoint file: torch (.pt, .pth, .bin, .ckpt) or .safetensors; the format is read "
            "from the file's content.",
            show_default=False,
        ),
    ],
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON (schema prunedoctor.inspect/1) instead of tables.")
    ] = False,
    tensors: Annotated[
        bool,
        typer.Option("--tensors", help="Also list every stored tensor with its shape, dtype, size in bytes and role."),
    ] = False,
    heads: Annotated[
        Optional[int],
        typer.Option(
            "--heads", min=1, help="Attention heads per block, for the ViT structure (a state dict does not store it)."
        ),
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model", metavar="NAME", help="timm model name to take the head count from (no weights are loaded)."
        ),
    ] = None,
    select: SelectOption = None,
    unsafe_load: UnsafeLoadOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Show what a checkpoint holds: format, container, prefixes, pruning reparametrization, sparsity, findings.

    Exits 0 when the file was read, whatever the findings (use 'check' to fail
    on them), and 2 when it cannot be read.
    """
    from prunedoctor.cli.render import render_inspect
    from prunedoctor.inspection import analyze_checkpoint, build_report, default_sections
    from prunedoctor.loading import load_checkpoint

    setup_logging(verbose, quiet)
    loaded = load_checkpoint(checkpoint, select=select, unsafe_load=unsafe_load)
    if heads is not None or model is not None:
        # A head count that the user gave must fit the checkpoint, so fail here instead of skipping the section.
        from prunedoctor.vit.arch import infer_architecture

        infer_architecture(loaded.state_dict, heads=heads, model_name=model, args=loaded.args)
    with analysis_progress(quiet, f"Measuring {checkpoint.name}") as progress:
        analysis = analyze_checkpoint(loaded, progress=progress)
    sections = default_sections(heads=heads, model_name=model)
    report = build_report(loaded, analysis=analysis, include_tensors=tensors, sections=sections)
    if json_output:
        print_json(report)
    else:
        render_inspect(report, stdout_console, show_tensors=tensors)


