"""The ``prunedoctor normalize`` command: merge pruning pairs and write a plain state dict."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from prunedoctor.cli.app import app
from prunedoctor.cli.common import handle_errors, setup_logging, stdout_console
from prunedoctor.cli.options import QuietOption, SelectOption, UnsafeLoadOption, VerboseOption, analysis_progress


class OutputFormatChoice(str, Enum):
    """File formats that normalize writes."""

    pt = "pt"
    safetensors = "safetensors"


@app.command("normalize")
@handle_errors
def normalize_command(
    checkpoint: Annotated[
        Path,
        typer.Argument(help="Checkpoint to normalize: torch (.pt, .pth, .bin, .ckpt) or .safetensors.", show_default=False),
    ],
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output",
            "-o",
            metavar="OUT",
            help="Output file; default <stem>.normalized.<ext> beside the input. Its extension sets the "
            "format unless --format is given.",
        ),
    ] = None,
    output_format: Annotated[
        Optional[OutputFormatChoice],
        typer.Option(
            "--format",
            case_sensitive=False,
            help="Output format: pt (torch.save) or safetensors; default from OUT's extension, else the input's format.",
        ),
    ] = None,
    masks_out: Annotated[
        Optional[Path],
        typer.Option(
            "--masks-out",
            metavar="FILE",
            help="Also write the masks, under their X_mask keys, to FILE (.pt or .safetensors); "
            "by default they are dropped.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT and FILE if they exist.")] = False,
    select: SelectOption = None,
    unsafe_load: UnsafeLoadOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Merge every X_orig/X_mask pair into X, drop the masks, remove wrappers and prefixes, and write the result.

    The output loads with model.load_state_dict(strict=True). It is written to
    a temporary file, re-read and compared tensor by tensor, then renamed into
    place; the input is never modified.
    """
    from prunedoctor.cli.render import render_normalize
    from prunedoctor.normalize import normalize_checkpoint

    setup_logging(verbose, quiet)
    with analysis_progress(quiet, f"Merging {checkpoint.name}") as progress:
        result = normalize_checkpoint(
            checkpoint,
            output,
            format=output_format.value if output_format is not None else None,
            masks_output=masks_out,
            force=force,
            select=select,
            unsafe_load=unsafe_load,
            progress=progress,
        )
    if not quiet:
        render_normalize(result, stdout_console)
