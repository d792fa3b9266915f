"""The ``prunedoctor check`` command: pruning rules for CI, by finding code."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from prunedoctor.cli.app import app
from prunedoctor.cli.common import fail, handle_errors, setup_logging, stdout_console
from prunedoctor.cli.options import QuietOption, UnsafeLoadOption, VerboseOption, analysis_progress, print_json


class CheckFormat(str, Enum):
    """Output formats of check."""

    text = "text"
    json = "json"
    github = "github"


class FailOn(str, Enum):
    """Lowest severity of a finding that fails a file."""

    error = "error"
    warning = "warning"
    info = "info"


@app.command("check")
@handle_errors
def check_command(
    checkpoints: Annotated[
        Optional[list[Path]],
        typer.Argument(help="Checkpoint files to check (torch or safetensors).", show_default=False),
    ] = None,
    select: Annotated[
        Optional[list[str]],
        typer.Option(
            "--select",
            metavar="CODES",
            help="Only report these finding codes, comma-separated or repeated (for example PD001,PD005); "
            "default: every code.",
        ),
    ] = None,
    ignore: Annotated[
        Optional[list[str]],
        typer.Option("--ignore", metavar="CODES", help="Skip these finding codes, comma-separated or repeated."),
    ] = None,
    min_sparsity: Annotated[
        Optional[float],
        typer.Option(
            "--min-sparsity",
            min=0.0,
            max=1.0,
            help="Fail (PD010) when the global sparsity, a fraction from 0 to 1, is below this.",
        ),
    ] = None,
    max_sparsity: Annotated[
        Optional[float],
        typer.Option(
            "--max-sparsity",
            min=0.0,
            max=1.0,
            help="Fail (PD010) when the global sparsity, a fraction from 0 to 1, is above this.",
        ),
    ] = None,
    fail_on: Annotated[
        Optional[FailOn],
        typer.Option("--fail-on", case_sensitive=False, help="Lowest severity that fails a file (default: error, or fail-on in pyproject.toml)."),
    ] = None,
    output_format: Annotated[
        CheckFormat,
        typer.Option(
            "--format",
            case_sensitive=False,
            help="Output: text tables, json (schema prunedoctor.check/1), or github (Actions annotations).",
        ),
    ] = CheckFormat.text,
    json_output: Annotated[bool, typer.Option("--json", help="Same as --format json.")] = False,
    config: Annotated[
        Optional[Path],
        typer.Option(
            "--config",
            metavar="TOML",
            help="Read \\[tool.prunedoctor] from this file instead of the nearest pyproject.toml upward "
            "from the current directory.",
        ),
    ] = None,
    no_config: Annotated[bool, typer.Option("--no-config", help="Ignore every pyproject.toml.")] = False,
    container: Annotated[
        Optional[str],
        typer.Option(
            "--container",
            metavar="KEY",
            help="Key path of the state dict inside each file, '/'-separated; by default the live model's weights.",
        ),
    ] = None,
    min_heads: Annotated[
        Optional[int],
        typer.Option("--min-heads", min=0, help="Fail (PD022) when a ViT block keeps fewer alive heads than this "
                     "(default: 1)."),
    ] = None,
    against: Annotated[
        Optional[Path],
        typer.Option(
            "--against",
            metavar="PREVIOUS",
            help="Checkpoint this one was pruned from: fail when a head or neuron pruned there is alive again "
            "(PD023) or the sparsity decreased (PD024).",
        ),
    ] = None,
    heads: Annotated[
        Optional[int],
        typer.Option("--heads", min=1, help="Attention heads per ViT block (a state dict does not store it)."),
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option("--model", metavar="NAME", help="timm model name to take the head count from."),
    ] = None,
    unsafe_load: UnsafeLoadOption = False,
    list_rules: Annotated[
        bool, typer.Option("--list-rules", help="Print every finding code with its meaning and exit.")
    ] = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Check checkpoints against pruning rules; exit 1 when a rule fails, 2 when a file cannot be read.

    Rules are finding codes (--list-rules): no leftover reparametrization,
    binary masks, no orphans, finite values, global sparsity in range, ...
    Defaults come from \\[tool.prunedoctor] in pyproject.toml; options given
    here win.
    """
    from prunedoctor.checks import check_checkpoints, resolve_options
    from prunedoctor.cli.render import format_github, render_check
    from prunedoctor.config import ConfigValueError, ProjectConfig, load_config, parse_codes

    setup_logging(verbose, quiet)
    if list_rules:
        _print_rules()
        return
    if not checkpoints:
        raise fail("no checkpoint given; pass one or more files, or --list-rules")
    try:
        selected = parse_codes(select) if select else None
        ignored = parse_codes(ignore) if ignore else None
    except ConfigValueError as error:
        raise fail(f"--select/--ignore: {error}") from None
    project = ProjectConfig() if no_config else load_config(config)
    options = resolve_options(
        project,
        select=selected,
        ignore=ignored,
        min_sparsity=min_sparsity,
        max_sparsity=max_sparsity,
        fail_on=fail_on.value if fail_on is not None else None,
        min_heads=min_heads,
        heads=heads,
        model=model,
        against=against,
    )
    if json_output:
        output_format = CheckFormat.json

    progress_context = analysis_progress(quiet or output_format != CheckFormat.text, "Checking")
    with progress_context as progress:
        result = check_checkpoints(
            checkpoints,
            options,
            container=container,
            unsafe_load=unsafe_load,
            config_path=project.path,
            on_file=(lambda path: progress) if progress is not None else None,
        )
    for item in result.files:
        if item.error is not None:
            fail(item.error)  # prints the one-line message; the exit code follows below
    if output_format == CheckFormat.json:
        print_json(result.to_dict())
    elif output_format == CheckFormat.github:
        stdout_console.file.write(format_github(result))
    else:
        render_check(result, stdout_console, quiet=quiet)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


def _print_rules() -> None:
    from rich.table import Table
    from rich.text import Text

    from prunedoctor.findings import FINDING_CODES

    table = Table(title="Finding codes", title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("code", no_wrap=True)
    table.add_column("meaning")
    for code, meaning in FINDING_CODES.items():
        table.add_row(code, Text(meaning))
    stdout_console.print(table)
