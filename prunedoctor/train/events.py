"""Options, progress events and results of a ``reproduce`` run.

The loop reports progress to a :class:`RunObserver` on rank 0 and never
prints; the command-line interface implements the observer with rich.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prunedoctor.train.config import RunConfig
from prunedoctor.train.outputs import EpochRecord, StateRecord
from prunedoctor.train.resume import Position

__all__ = ["RunOptions", "RunInfo", "BatchProgress", "RunObserver", "RunResult"]


@dataclass(frozen=True)
class RunOptions:
    """Execution settings of a run that do not change its results: paths, devices and checkpointing.

    Attributes:
        config: Settings that determine the results; ignored when resuming
            (the run folder's ``config.json`` is used).
        run_dir: Run folder.
        resume: Continue the run in ``run_dir`` from its resume checkpoint.
        force: Start a fresh run in a non-empty ``run_dir``, replacing its outputs.
        device: ``auto``, ``cpu`` or ``cuda``.
        workers: DataLoader worker processes that build training batches (0: the main process).
        save_every_batches: Write a resume checkpoint every this many training
            batches (0: only at the end of each epoch and state).
        threads: torch CPU threads per process (None: torch's default, divided
            among the processes of a distributed run).
        download: Let torchvision download CIFAR or Fashion-MNIST when missing.
    """

    config: RunConfig
    run_dir: Path
    resume: bool = False
    force: bool = False
    device: str = "auto"
    workers: int = 0
    save_every_batches: int = 100
    threads: int | None = None
    download: bool = False


@dataclass(frozen=True)
class RunInfo:
    """Facts about a run that has started, for the display."""

    run_dir: Path
    config: RunConfig
    device: str
    world_size: int
    train_images: int
    val_images: int
    test_images: int
    batches_per_epoch: int
    prunable_weights: int
    resumed_at: Position | None


@dataclass(frozen=True)
class BatchProgress:
    """Running values after one training batch (this rank's share; accuracy is a fraction)."""

    state: int
    epoch: int
    batch: int
    batches: int
    loss: float
    accuracy: float
    lr: float
    rsst_lambda: float | None


class RunObserver:
    """Receives progress events on rank 0; every method does nothing by default."""

    def run_started(self, info: RunInfo) -> None:
        """Called once the data, model and position are ready."""

    def epoch_started(self, state: int, epoch: int, batches: int, first_batch: int) -> None:
        """Called before the first (or the resumed) batch of an epoch."""

    def batch_finished(self, progress: BatchProgress) -> None:
        """Called after each optimizer step."""

    def evaluation_started(self, state: int, epoch: int) -> None:
        """Called before the validation and test passes of an epoch."""

    def epoch_finished(self, record: EpochRecord) -> None:
        """Called with an epoch's results."""

    def state_finished(self, record: StateRecord) -> None:
        """Called with a state's summary row after its files are written."""


@dataclass
class RunResult:
    """Outputs of a finished run.

    Attributes:
        run_dir: Run folder.
        states: One summary row per state.
        epochs: One row per epoch.
        files: Every file that the run wrote in the run folder, at the top
            level and in each ``state_K`` folder. Other files are left out.
        world_size: Number of processes that trained.
        already_complete: True when a resumed run had nothing left to train.
    """

    run_dir: Path
    states: list[StateRecord]
    epochs: list[EpochRecord]
    files: list[Path] = field(default_factory=list)
    world_size: int = 1
    already_complete: bool = False
