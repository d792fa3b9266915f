"""The ``prunedoctor prune`` command: re-run head/MLP pruning on a checkpoint."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from prunedoctor.cli.app import app
from prunedoctor.cli.common import fail, handle_errors, setup_logging, stderr_console, stdout_console

if TYPE_CHECKING:
    from prunedoctor.vit.arch import VitArchitecture
    from prunedoctor.vit.calibration import CalibrationData
    from prunedoctor.vit.pruning import PruneConfig


class Criterion(str, Enum):
    remain = "remain"
    magnitude = "magnitude"
    l1 = "l1"
    l2 = "l2"
    saliency = "saliency"


class Sorting(str, Enum):
    layer_wise = "layer-wise"
    global_ = "global"


class Target(str, Enum):
    head = "head"
    mlp = "mlp"
    both = "both"


class OutputKind(str, Enum):
    reparam = "reparam"
    normalized = "normalized"


class DatasetKind(str, Enum):
    auto = "auto"
    cifar10 = "cifar10"
    cifar100 = "cifar100"
    image_folder = "image-folder"


_FRACTION = {"min": 0.0, "max": 1.0}


@app.command("prune", no_args_is_help=True)
@handle_errors
def prune_command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to prune (.pt, .pth, .bin, .safetensors).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write the pruned state dict to.")],
    criterion: Annotated[
        Criterion, typer.Option(help="Unit importance: mask entries left, |W| sum, or activation l1/l2/saliency.")
    ] = Criterion.magnitude,
    sorting: Annotated[
        Sorting, typer.Option(help="Rank units within each layer, or pool the layers of one kind.")
    ] = Sorting.layer_wise,
    normalize_scores: Annotated[
        bool,
        typer.Option(
            "--normalize-scores/--raw-scores",
            help="With --sorting global, divide each layer's scores by the layer mean before pooling.",
        ),
    ] = True,
    target: Annotated[
        Optional[Target],
        typer.Option(help="Units to prune; by default the kinds whose ratio is given (both with --refill)."),
    ] = None,
    head_ratio: Annotated[
        Optional[float], typer.Option(help="Fraction of heads to prune (ratio budget), 0 to 1.", **_FRACTION)
    ] = None,
    mlp_ratio: Annotated[
        Optional[float], typer.Option(help="Fraction of MLP neurons to prune (ratio budget), 0 to 1.", **_FRACTION)
    ] = None,
    refill: Annotated[
        bool,
        typer.Option(
            "--refill",
            help="Refill budget: prune --rate of the weights by global magnitude, then keep in each layer as many "
            "units as the surviving weights would fill.",
        ),
    ] = False,
    rate: Annotated[
        float,
        typer.Option(help="Refill: fraction of surviving weights pruned by global magnitude, 0 to 1.", **_FRACTION),
    ] = 0.3,
    refill_rate: Annotated[
        float,
        typer.Option(help="Refill: fraction of the units beyond what the magnitude mask covers that are kept too "
                     "(0 = Refill, above 0 = Refill+).", **_FRACTION),
    ] = 0.0,
    min_keep: Annotated[int, typer.Option(help="Minimum units each layer keeps.", min=0)] = 1,
    mask_bias: Annotated[
        bool, typer.Option("--mask-bias", help="Also mask the qkv and fc1 biases of pruned units.")
    ] = False,
    include_output_side: Annotated[
        bool, typer.Option("--include-output-side", help="Add proj columns and fc2 columns to remain/magnitude scores.")
    ] = False,
    output_kind: Annotated[
        OutputKind,
        typer.Option("--as", help="reparam: weight_orig/weight_mask pairs; normalized: weights with masks applied."),
    ] = OutputKind.reparam,
    masks_out: Annotated[
        Optional[Path], typer.Option(help="Also write the masks (keys X.weight_mask) to this file.")
    ] = None,
    data: Annotated[
        Optional[Path], typer.Option(help="Calibration data for l1/l2/saliency: a CIFAR folder or an image folder.")
    ] = None,
    dataset: Annotated[
        DatasetKind, typer.Option(help="Kind of --data; auto detects it from the files.")
    ] = DatasetKind.auto,
    calib_batches: Annotated[int, typer.Option(help="Number of calibration batches.", min=1)] = 4,
    batch_size: Annotated[int, typer.Option(help="Images per calibration batch.", min=1)] = 32,
    heads: Annotated[
        Optional[int], typer.Option(help="Head count per block (a state dict does not store it).", min=1)
    ] = None,
    model: Annotated[Optional[str], typer.Option(help="timm model name to take the head count from.")] = None,
    select: Annotated[Optional[str], typer.Option(help="Key path of the state dict inside the file.")] = None,
    unsafe_load: Annotated[
        bool, typer.Option("--unsafe-load", help="Load pickles that need globals outside the allowlist (runs code).")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing output files.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors (and --json).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details on stderr.")] = False,
) -> None:
    """Re-run head/MLP pruning on a checkpoint and write the pruned state dict.

    The checkpoint may hold plain weights or weight_orig/weight_mask pairs;
    scores always come from the effective weights (orig * mask). Exit codes:
    0 written, 2 bad input.
    """
    import importlib
    import time

    from prunedoctor.io import format_from_path, save_state_dict
    from prunedoctor.loading import load_checkpoint
    from prunedoctor.reparam import effective_state_dict, masks_of
    from prunedoctor.vit.arch import infer_architecture
    from prunedoctor.vit.export import build_prune_report, to_mask_file, to_normalized, to_reparametrized
    from prunedoctor.vit.pruning import prune_units
    from prunedoctor.vit.structure import build_vit_report

    setup_logging(verbose, quiet)
    config = _build_config(criterion, sorting, normalize_scores, target, head_ratio, mlp_ratio, refill, rate,
                           refill_rate, min_keep, mask_bias, include_output_side)
    _check_data_option(config, data)
    _check_outputs(output, masks_out, force, format_from_path)

    # torch is imported before the timer starts, so that the reported load time is the file's alone.
    importlib.import_module("torch")

    started = time.perf_counter()
    loaded = load_checkpoint(checkpoint, select=select, unsafe_load=unsafe_load)
    weights = effective_state_dict(loaded.state_dict)
    masks = masks_of(loaded.state_dict)
    arch = infer_architecture(loaded.state_dict, heads=heads, model_name=model, args=loaded.args)
    load_seconds = time.perf_counter() - started

    calibration = None
    activation_scores = None
    if data is not None:
        calibration, activation_scores = _score_activations(data, dataset.value, arch, weights, config,
                                                            calib_batches, batch_size, quiet)

    started = time.perf_counter()
    result = prune_units(weights, masks, arch, config, activation_scores=activation_scores)
    prune_seconds = time.perf_counter() - started

    pruned = to_reparametrized(weights, result.masks) if output_kind is OutputKind.reparam else to_normalized(
        weights, result.masks
    )
    written = save_state_dict(pruned, output, force=force)
    masks_written = save_state_dict(to_mask_file(result.masks), masks_out, force=force) if masks_out else None

    report = build_prune_report(
        result, arch, build_vit_report(weights, masks, arch), build_vit_report(to_normalized(weights, result.masks),
                                                                               result.masks, arch)
    )
    report.update(
        {
            "input": str(checkpoint),
            "output": str(output),
            "output_as": output_kind.value,
            "bytes_written": written,
            "masks_out": str(masks_out) if masks_out else None,
            "masks_bytes_written": masks_written,
            "calibration": _calibration_summary(calibration),
            "seconds": {"load": round(load_seconds, 3), "prune": round(prune_seconds, 3)},
        }
    )
    if json_output:
        typer.echo(json.dumps(report, indent=2))
    elif not quiet:
        from prunedoctor.cli.render_vit import render_prune_report

        render_prune_report(stdout_console, report)


def _build_config(
    criterion: Criterion,
    sorting: Sorting,
    normalize_scores: bool,
    target: Target | None,
    head_ratio: float | None,
    mlp_ratio: float | None,
    refill: bool,
    rate: float,
    refill_rate: float,
    min_keep: int,
    mask_bias: bool,
    include_output_side: bool,
) -> PruneConfig:
    """Turn the options into a :class:`PruneConfig`, raising typer.Exit(2) on a contradiction."""
    from prunedoctor.vit.pruning import PruneConfig

    if refill and (head_ratio is not None or mlp_ratio is not None):
        raise fail("--refill sets the budget from --rate and --refill-rate; drop --head-ratio and --mlp-ratio")
    if not refill and head_ratio is None and mlp_ratio is None:
        raise fail("no budget given: pass --head-ratio and/or --mlp-ratio, or --refill with --rate")
    if target is None:
        if refill or (head_ratio is not None and mlp_ratio is not None):
            target = Target.both
        else:
            target = Target.head if head_ratio is not None else Target.mlp
    if not refill:
        if target in (Target.head, Target.both) and head_ratio is None:
            raise fail(f"--target {target.value} prunes heads: pass --head-ratio")
        if target in (Target.mlp, Target.both) and mlp_ratio is None:
            raise fail(f"--target {target.value} prunes MLP neurons: pass --mlp-ratio")
    return PruneConfig(
        criterion=criterion.value,
        sorting=sorting.value,
        normalize_scores=normalize_scores,
        target=target.value,
        head_ratio=head_ratio or 0.0,
        mlp_ratio=mlp_ratio or 0.0,
        refill=refill,
        rate=rate,
        refill_rate=refill_rate,
        min_keep=min_keep,
        mask_bias=mask_bias,
        include_output_side=include_output_side,
    )


def _check_data_option(config: PruneConfig, data: Path | None) -> None:
    from prunedoctor.vit.pruning import ACTIVATION_CRITERIA

    if config.criterion in ACTIVATION_CRITERIA and data is None:
        raise fail(
            f"--criterion {config.criterion} runs the model on calibration images: pass --data with a CIFAR "
            "folder or an image folder"
        )
    if config.criterion not in ACTIVATION_CRITERIA and data is not None:
        raise fail(f"--data is used by the l1, l2 and saliency criteria only, not by {config.criterion}; drop it")


def _check_outputs(output: Path, masks_out: Path | None, force: bool, format_from_path: Any) -> None:
    """Fail before any work when an output exists or has an unknown extension."""
    from prunedoctor.errors import OutputExistsError

    for path in (output, masks_out):
        if path is None:
            continue
        format_from_path(path)
        if path.exists() and not force:
            raise OutputExistsError(f"{path}: file exists; pass --force to overwrite it")
    if masks_out is not None and masks_out.resolve() == output.resolve():
        raise fail(f"--masks-out {masks_out} is the same file as --output; give it another name")


def _score_activations(
    data: Path,
    dataset: str,
    arch: VitArchitecture,
    weights: dict[str, Any],
    config: PruneConfig,
    calib_batches: int,
    batch_size: int,
    quiet: bool,
) -> tuple[CalibrationData, dict[str, Any]]:
    """Build the model, load the weights strictly and score units on calibration batches."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from prunedoctor.vit.arch import build_timm_model, load_weights_strictly
    from prunedoctor.vit.calibration import load_calibration_batches
    from prunedoctor.vit.pruning import compute_activation_scores

    calibration = load_calibration_batches(data, arch, batches=calib_batches, batch_size=batch_size, dataset=dataset)
    model = build_timm_model(arch)
    load_weights_strictly(model, weights)
    progress = Progress(
        TextColumn(f"scoring units ({config.criterion})"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr_console,
        transient=True,
        disable=quiet or not stderr_console.is_terminal,
    )
    with progress:
        task = progress.add_task("calibration", total=len(calibration.batches))
        scores = compute_activation_scores(
            model, calibration.batches, config.criterion, on_batch=lambda done: progress.update(task, completed=done)
        )
    return calibration, scores


def _calibration_summary(calibration: CalibrationData | None) -> dict[str, Any] | None:
    if calibration is None:
        return None
    return {
        "dataset": calibration.dataset,
        "source": calibration.source,
        "batches": len(calibration.batches),
        "images": calibration.images,
        "resized_from": calibration.resized_from,
    }
