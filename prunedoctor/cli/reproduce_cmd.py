"""The ``prunedoctor reproduce`` command: run the Refill or RSST loop and show its progress."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from prunedoctor.cli.app import app
from prunedoctor.cli.common import fail, handle_errors, setup_logging, stdout_console

if TYPE_CHECKING:
    from prunedoctor.train.loop import BatchProgress, RunInfo, RunResult
    from prunedoctor.train.outputs import EpochRecord, StateRecord

_DATA = "Data"
_MODEL = "Model and pruning"
_TRAIN = "Training"
_RUN = "Run folder and resources"


@app.command("reproduce", no_args_is_help=False)
@handle_errors
def reproduce_command(
    dataset: Annotated[
        Optional[str],
        typer.Option(
            help="Data set: cifar10, cifar100, image-folder or fashion-mnist \\[default: cifar10].",
            rich_help_panel=_DATA,
        ),
    ] = None,
    data_dir: Annotated[
        Optional[Path],
        typer.Option(
            help=(
                "Folder with the data set (cifar-10-batches-py, cifar-100-python, Fashion-MNIST's IDX files) or, "
                "for image-folder, a folder or .tar.gz with train/<class>/ and test/<class>/ "
                "\\[default: ./data for CIFAR, /usr/share/datasets/fashion-mnist for Fashion-MNIST]."
            ),
            rich_help_panel=_DATA,
        ),
    ] = None,
    download: Annotated[
        bool,
        typer.Option(
            "--download", help="Download CIFAR or Fashion-MNIST with torchvision into --data-dir if missing.",
            rich_help_panel=_DATA,
        ),
    ] = False,
    val_size: Annotated[
        Optional[int],
        typer.Option(help="Images held out of the end of the training set for validation \\[default: 5000].",
                     rich_help_panel=_DATA),
    ] = None,
    subset: Annotated[
        Optional[int],
        typer.Option(help="Train on the first N training images and evaluate on at most N validation and N test "
                     "images, for quick runs \\[default: all].", rich_help_panel=_DATA),
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option(help="Preset (vit-demo, vit-micro, vit-tiny, vit-small, vit-base; 32x32 inputs, patch 4) or a "
                     "timm ViT name, built untrained \\[default: vit-demo].", rich_help_panel=_MODEL),
    ] = None,
    img_size: Annotated[
        Optional[int],
        typer.Option(help="Input size in pixels; images are resized to it \\[default: the data set's size].",
                     rich_help_panel=_MODEL),
    ] = None,
    iters: Annotated[
        Optional[int],
        typer.Option(help="Number of pruning states (state 0 trains the dense model) \\[default: 3].",
                     rich_help_panel=_MODEL),
    ] = None,
    rate: Annotated[
        Optional[float],
        typer.Option(help="Fraction of the surviving prunable weights removed per state \\[default: 0.3].",
                     rich_help_panel=_MODEL),
    ] = None,
    criterion: Annotated[
        Optional[str],
        typer.Option(help="Unit importance: magnitude, remain, l1, l2 or saliency \\[default: magnitude].",
                     rich_help_panel=_MODEL),
    ] = None,
    sorting: Annotated[
        Optional[str],
        typer.Option(help="Rank units over all blocks (global) or within each block (layer-wise) "
                     "\\[default: global].", rich_help_panel=_MODEL),
    ] = None,
    target: Annotated[
        Optional[str],
        typer.Option(help="Units to prune: both, head or mlp \\[default: both].", rich_help_panel=_MODEL),
    ] = None,
    refill_rate: Annotated[
        Optional[float],
        typer.Option(help="Fraction of the units beyond the Refill budget that are kept anyway (0 is Refill, "
                     "above 0 Refill+) \\[default: 0].", rich_help_panel=_MODEL),
    ] = None,
    method: Annotated[
        Optional[str],
        typer.Option(help="refill cuts to the new masks at once; rsst trains a state with a growing penalty on the "
                     "weights to remove, then cuts \\[default: refill].", rich_help_panel=_MODEL),
    ] = None,
    rsst_schedule: Annotated[
        Optional[str],
        typer.Option(help="Growth of the RSST penalty factor lambda over a state: x, x^2, x^3, exp or "
                     "exp_custom_exponents \\[default: exp_custom_exponents].", rich_help_panel=_MODEL),
    ] = None,
    rsst_granularity: Annotated[
        Optional[float],
        typer.Option(help="Final RSST lambda, added as lambda * w to the gradient of each penalised weight "
                     "\\[default: 1.0].", rich_help_panel=_MODEL),
    ] = None,
    rsst_exponent: Annotated[
        Optional[float],
        typer.Option(help="Exponent p of the exp_custom_exponents schedule \\[default: 4].", rich_help_panel=_MODEL),
    ] = None,
    calibration_batches: Annotated[
        Optional[int],
        typer.Option(help="Training batches that l1, l2 and saliency read to score units \\[default: 4].",
                     rich_help_panel=_MODEL),
    ] = None,
    epochs: Annotated[
        Optional[int],
        typer.Option(help="Training epochs per state \\[default: 2].", rich_help_panel=_TRAIN),
    ] = None,
    rewind_epoch: Annotated[
        Optional[int],
        typer.Option(help="Epoch of state 0 whose weights every later state restarts from; 0 means the initial "
                     "weights \\[default: 0].", rich_help_panel=_TRAIN),
    ] = None,
    lr: Annotated[
        Optional[float],
        typer.Option(help="SGD learning rate after warmup \\[default: 0.1].", rich_help_panel=_TRAIN),
    ] = None,
    momentum: Annotated[
        Optional[float], typer.Option(help="SGD momentum \\[default: 0.9].", rich_help_panel=_TRAIN)
    ] = None,
    weight_decay: Annotated[
        Optional[float], typer.Option(help="SGD weight decay \\[default: 5e-05].", rich_help_panel=_TRAIN)
    ] = None,
    batch_size: Annotated[
        Optional[int],
        typer.Option(help="Global training batch in images, split over the processes \\[default: 128].",
                     rich_help_panel=_TRAIN),
    ] = None,
    warmup_epochs: Annotated[
        Optional[float],
        typer.Option(help="Epochs of linear learning-rate warmup at the start of each state (fractions allowed) "
                     "\\[default: 0.5].", rich_help_panel=_TRAIN),
    ] = None,
    lr_schedule: Annotated[
        Optional[str],
        typer.Option(help="cosine decays to 0 over the state; multistep divides by 10 at 50% and 75% of it "
                     "\\[default: cosine].", rich_help_panel=_TRAIN),
    ] = None,
    amp: Annotated[
        Optional[bool],
        typer.Option("--amp/--no-amp", help="Train and evaluate in bfloat16 autocast (CUDA only) \\[default: off].",
                     rich_help_panel=_TRAIN),
    ] = None,
    seed: Annotated[
        Optional[int],
        typer.Option(help="Seed of the initial weights, the data order and the augmentation \\[default: 0].",
                     rich_help_panel=_TRAIN),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", help="Run folder to create \\[default: runs/reproduce-<model>-<date>-<time>].",
                     rich_help_panel=_RUN),
    ] = None,
    resume: Annotated[
        Optional[Path],
        typer.Option("--resume", metavar="RUN_DIR",
                     help="Continue the run in RUN_DIR from its last checkpoint, with its saved settings.",
                     rich_help_panel=_RUN),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Start over in a non-empty --out folder, replacing its run files.",
                     rich_help_panel=_RUN),
    ] = False,
    save_every_batches: Annotated[
        int,
        typer.Option(help="Write a resume checkpoint every N training batches, besides every epoch and state "
                     "(0: only those).", rich_help_panel=_RUN),
    ] = 100,
    device: Annotated[
        str, typer.Option(help="Device: auto (CUDA if available), cpu or cuda.", rich_help_panel=_RUN)
    ] = "auto",
    workers: Annotated[
        int,
        typer.Option(help="DataLoader worker processes that build training batches (0: the main process).",
                     rich_help_panel=_RUN),
    ] = 0,
    threads: Annotated[
        Optional[int],
        typer.Option(help="torch CPU threads per process \\[default: torch's choice, shared among torchrun's "
                     "processes].", rich_help_panel=_RUN),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print nothing but errors.", rich_help_panel=_RUN)
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also print debug log records on stderr.", rich_help_panel=_RUN)
    ] = False,
) -> None:
    """Re-run iterative Refill (or RSST) head and neuron pruning of a ViT and write every state.

    Trains --iters states of --epochs epochs. After each state, --rate of the
    surviving qkv, proj, fc1 and fc2 weights are pruned by global magnitude,
    the mask is turned into whole heads and MLP neurons, and the weights go
    back to the rewind point. Each state's normalized weights and masks land in
    RUN_DIR/state_K/, ready for inspect, diff and check. Start several
    processes with torchrun to train with DistributedDataParallel.
    """
    import logging

    from prunedoctor.train.config import RunConfig

    setup_logging(verbose=verbose, quiet=quiet)
    package_logger = logging.getLogger("prunedoctor")
    for handler in package_logger.handlers:
        # The live display shows progress; the console gets warnings only,
        # while RUN_DIR/log.txt records everything from INFO up.
        handler.setLevel(logging.DEBUG if verbose else logging.WARNING)
    package_logger.setLevel(logging.DEBUG if verbose else logging.INFO)

    given = {
        "dataset": dataset, "data_dir": None if data_dir is None else str(data_dir), "val_size": val_size,
        "subset": subset, "model": model, "img_size": img_size, "iters": iters, "epochs": epochs, "rate": rate,
        "criterion": criterion, "sorting": sorting, "target": target, "refill_rate": refill_rate,
        "method": method, "rsst_schedule": rsst_schedule, "rsst_granularity": rsst_granularity,
        "rsst_exponent": rsst_exponent, "rewind_epoch": rewind_epoch, "lr": lr, "momentum": momentum,
        "weight_decay": weight_decay, "batch_size": batch_size, "warmup_epochs": warmup_epochs,
        "lr_schedule": lr_schedule, "calibration_batches": calibration_batches, "seed": seed, "amp": amp,
    }
    settings = {key: value for key, value in given.items() if value is not None}
    rank = int(os.environ.get("RANK", "0") or 0)
    distributed = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1

    if resume is not None:
        if settings:
            options = ", ".join("--" + key.replace("_", "-") for key in sorted(settings))
            raise fail(f"--resume takes every setting from {resume / 'config.json'}; drop {options}")
        if out is not None and out != resume:
            raise fail(f"--resume {resume} continues that folder; drop --out {out}")
        run_dir = resume
    elif out is not None:
        run_dir = out
    elif distributed:
        raise fail("pass --out RUN_DIR when starting with torchrun, so that every process writes to one folder")
    else:
        run_dir = Path("runs") / f"reproduce-{settings.get('model', RunConfig.model)}-{time.strftime('%Y%m%d-%H%M%S')}"

    config = RunConfig(**settings)
    show = not quiet and rank == 0
    _run_and_render(config, run_dir, resume is not None, force, device, workers, save_every_batches, threads,
                    download, show)


def _run_and_render(
    config: Any,
    run_dir: Path,
    resume: bool,
    force: bool,
    device: str,
    workers: int,
    save_every_batches: int,
    threads: int | None,
    download: bool,
    show: bool,
) -> None:
    from prunedoctor.train.loop import RunOptions, run_reproduction

    if save_every_batches < 0:
        raise fail(f"--save-every-batches must be 0 or more, got {save_every_batches}")
    if workers < 0:
        raise fail(f"--workers must be 0 or more, got {workers}")
    options = RunOptions(
        config=config, run_dir=run_dir, resume=resume, force=force, device=device, workers=workers,
        save_every_batches=save_every_batches, threads=threads, download=download,
    )
    display = _Display(stdout_console, enabled=show, live=show and stdout_console.is_terminal)
    try:
        with display:
            result: RunResult = run_reproduction(options, display)
    except KeyboardInterrupt:
        raise fail(f"interrupted; continue with: prunedoctor reproduce --resume {run_dir}", 130) from None
    if show:
        if result.already_complete:
            stdout_console.print(
                f"Run {escape(str(run_dir))} is already complete ({_plural(len(result.states), 'state')} trained); "
                "nothing to resume.",
                soft_wrap=True,
            )
        _render_result(stdout_console, result)
    sys.stdout.flush()


class _Display:
    """Live progress of a run on rank 0: two bars (run and epoch) and one line per epoch and state.

    Implements the methods of :class:`prunedoctor.train.events.RunObserver`.
    Without a terminal (``live`` false) it prints the epoch and state lines
    only; disabled, it prints nothing.
    """

    def __init__(self, console: Console, *, enabled: bool, live: bool) -> None:
        self.console = console
        self.enabled = enabled
        self.live = live
        self.progress: Progress | None = None
        self.run_task: TaskID | None = None
        self.epoch_task: TaskID | None = None
        self.info: RunInfo | None = None

    def __enter__(self) -> _Display:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def run_started(self, info: RunInfo) -> None:
        self.info = info
        if not self.enabled:
            return
        config = info.config
        verb = "Resuming" if info.resumed_at is not None else "Running"
        where = f"{info.world_size} processes on {info.device}" if info.world_size > 1 else info.device
        self.console.print(
            f"[bold]{verb} {config.method}[/bold] on [cyan]{escape(config.model)}[/cyan] / "
            f"{escape(config.dataset)} ({info.train_images:,} train, {info.val_images:,} val, "
            f"{info.test_images:,} test images), {_plural(config.iters, 'state')} x "
            f"{_plural(config.epochs, 'epoch')}, "
            f"rate {config.rate:g}, {config.criterion}/{config.sorting}/{config.target}, {where}",
            soft_wrap=True,
        )
        self.console.print(f"Run folder: {escape(str(info.run_dir))}", style="dim", soft_wrap=True)

        if info.resumed_at is not None:
            at = info.resumed_at
            self.console.print(f"Continuing at state {at.state}, epoch {at.epoch}, batch {at.batch}", style="dim")
        if not self.live:
            return

        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description:<15}", style="bold"),
            BarColumn(bar_width=28),
            MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        total = config.iters * config.epochs * info.batches_per_epoch
        done = 0
        if info.resumed_at is not None:
            at = info.resumed_at
            done = min(total, (at.state * config.epochs + at.epoch) * info.batches_per_epoch + at.batch)
        self.run_task = self.progress.add_task("run", total=total, completed=done, metrics="")
        self.epoch_task = self.progress.add_task("epoch", total=info.batches_per_epoch, metrics="")
        self.progress.start()

    def epoch_started(self, state: int, epoch: int, batches: int, first_batch: int) -> None:
        if self.progress is None or self.epoch_task is None:
            return
        self.progress.reset(
            self.epoch_task,
            total=batches,
            completed=first_batch,
            description=f"state {state} epoch {epoch}",
            metrics="",
        )

    def batch_finished(self, progress: BatchProgress) -> None:
        if self.progress is None or self.epoch_task is None or self.run_task is None:
            return
        metrics = f"loss {progress.loss:.3f}  acc {100 * progress.accuracy:5.1f}%  lr {format_lr(progress.lr)}"
        if progress.rsst_lambda is not None:
            metrics += f"  lambda {progress.rsst_lambda:.3g}"
        self.progress.update(self.epoch_task, completed=progress.batch + 1, metrics=metrics)
        self.progress.advance(self.run_task)

    def evaluation_started(self, state: int, epoch: int) -> None:
        if self.progress is None or self.epoch_task is None:
            return
        self.progress.update(self.epoch_task, metrics="evaluating on validation and test images")

    def epoch_finished(self, record: EpochRecord) -> None:
        if not self.enabled:
            return
        if self.progress is not None and self.epoch_task is not None:
            self.progress.update(
                self.epoch_task,
                metrics=f"val {100 * record.val_accuracy:.1f}%  test {100 * record.test_accuracy:.1f}%",
            )
        line = (
            f"state {record.state} epoch {record.epoch}: train loss {record.train_loss:.3f}, "
            f"train {100 * record.train_accuracy:.1f}%, val {100 * record.val_accuracy:.1f}%, "
            f"test {100 * record.test_accuracy:.1f}%, end lr {format_lr(record.lr)}"
        )
        if record.rsst_lambda is not None:
            line += f", lambda {record.rsst_lambda:.3g}, penalised norm {record.penalised_norm:.3g}"
        self._print(line)

    def state_finished(self, record: StateRecord) -> None:
        if not self.enabled:
            return
        self._print(
            f"[bold green]state {record.state} done[/bold green]: {100 * record.remaining:.2f}% weights remain, "
            f"heads {sum(record.heads_kept)}/{sum(record.heads_total)}, "
            f"neurons {sum(record.neurons_kept)}/{sum(record.neurons_total)}, "
            f"test {100 * record.test_accuracy:.2f}% (best val epoch {record.best_epoch})"
        )

    def _print(self, text: str) -> None:
        target = self.progress.console if self.progress is not None else self.console
        target.print(text, soft_wrap=True)


def _render_result(console: Console, result: RunResult) -> None:
    from prunedoctor.train.outputs import state_table

    header, rows = state_table(result.states)
    table = Table(title="Iterative pruning states", title_justify="left", header_style="bold")
    for name in header:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if result.states:
        last = result.states[-1]
        per_block = " ".join(f"{h}/{t}" for h, t in zip(last.heads_kept, last.heads_total))
        console.print(f"Heads kept per block in state {last.state}: {per_block}")
    files = [path for path in result.files if path.is_file()]
    total = sum(path.stat().st_size for path in files)
    amount = f"{_plural(len(files), 'file')} ({total / 1e6:.2f} MB)"
    where = escape(str(result.run_dir))
    console.print(
        (f"{where} contains {amount}: " if result.already_complete else f"Wrote {amount} to {where}: ")
        + "config.json, resume.pt, log.txt, history.json, history.csv, summary.md, accuracy.png and "
        "state_K/ with model.pt, masks.pt, rewind.pt, config.json, rng.pt, record.json",
        soft_wrap=True,
    )


def format_lr(lr: float) -> str:
    """Format a learning rate with three significant digits, so that no nonzero rate reads as 0.

    Args:
        lr: Learning rate.

    Returns:
        ``0`` for zero, otherwise e.g. ``0.1``, ``0.0031`` or ``3.1e-05``.
    """
    return f"{lr:.3g}"


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"
