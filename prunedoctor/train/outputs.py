"""Files of a run folder: atomic writes, history, the summary table and the accuracy plot.

Layout of ``RUN_DIR``::

    config.json            settings of the run (RunConfig)
    log.txt                log records of every process start, epoch and state
    resume.pt              latest resume checkpoint (see prunedoctor.train.resume)
    history.json/.csv      one row per epoch; history.json also has one record per state
    summary.md             table of the states
    accuracy.png           test accuracy against remaining weights
    state_K/model.pt       normalized weights after state K's training (plain timm names)
    state_K/masks.pt       parameter name -> mask that state K trained with
    state_K/rewind.pt      the rewind point (plain timm names)
    state_K/config.json    settings, with the state index
    state_K/rng.pt         random number generator states at the end of state K
    state_K/record.json    the state's summary row
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prunedoctor.io import write_bytes_atomic

__all__ = [
    "EpochRecord",
    "StateRecord",
    "state_table",
    "write_text_atomic",
    "save_torch_atomic",
    "write_history",
    "format_summary_markdown",
    "plot_accuracy",
    "state_dir",
]

_logger = logging.getLogger(__name__)

EPOCH_FIELDS = (
    "state", "epoch", "train_loss", "train_accuracy", "val_accuracy", "test_accuracy",
    "lr", "rsst_lambda", "penalised_norm", "seconds",
)


@dataclass
class EpochRecord:
    """Results of one epoch. Accuracies are fractions in [0, 1]; ``lr`` is the last step's rate."""

    state: int
    epoch: int
    train_loss: float
    train_accuracy: float
    val_accuracy: float
    test_accuracy: float
    lr: float
    rsst_lambda: float | None = None
    penalised_norm: float | None = None
    seconds: float = 0.0


@dataclass
class StateRecord:
    """Summary of one state: the row of the final table.

    Attributes:
        state: State index, from 0.
        remaining: Fraction of the prunable (qkv, proj, fc1, fc2) weights kept by the masks.
        heads_kept: Heads kept per block.
        neurons_kept: MLP neurons kept per block.
        best_epoch: Epoch (from 0) with the best validation accuracy.
        val_accuracy: Best validation accuracy.
        test_accuracy: Test accuracy at the best validation epoch.
        test_accuracy_after_cut: RSST only: test accuracy after the structured masks were applied hard.
        seconds: Wall time of the state, summed over resumed processes.
        masks_sha256: Hash of the masks' nonzero pattern (equal across ranks and reruns).
    """

    state: int
    remaining: float
    heads_kept: list[int]
    neurons_kept: list[int]
    best_epoch: int
    val_accuracy: float
    test_accuracy: float
    seconds: float
    masks_sha256: str
    test_accuracy_after_cut: float | None = None
    heads_total: list[int] = field(default_factory=list)
    neurons_total: list[int] = field(default_factory=list)


def state_dir(run_dir: Path, state: int) -> Path:
    """Return the folder of state ``state`` inside ``run_dir``."""
    return run_dir / f"state_{state}"


def write_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 text atomically (see :func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def save_torch_atomic(obj: Any, path: Path) -> None:
    """Save ``obj`` with ``torch.save`` atomically (see :func:`write_bytes_atomic`)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def write_history(
    run_dir: Path, epochs: Sequence[EpochRecord], states: Sequence[StateRecord], config: Mapping[str, Any]
) -> None:
    """Write ``history.json`` (config, epochs, states), ``history.csv`` (epochs) and ``summary.md``."""
    payload = {
        "config": dict(config),
        "epochs": [asdict(e) for e in epochs],
        "states": [asdict(s) for s in states],
    }
    write_text_atomic(run_dir / "history.json", json.dumps(payload, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(EPOCH_FIELDS), lineterminator="\n")
    writer.writeheader()
    for record in epochs:
        writer.writerow({k: ("" if v is None else v) for k, v in asdict(record).items() if k in EPOCH_FIELDS})
    write_text_atomic(run_dir / "history.csv", buffer.getvalue())
    write_text_atomic(run_dir / "summary.md", format_summary_markdown(states))


def state_table(states: Sequence[StateRecord]) -> tuple[list[str], list[list[str]]]:
    """Return the header and the rows of the state table (accuracies and remaining weights in percent).

    The "after cut" column appears only for RSST runs, which record the test
    accuracy after the structured masks were applied hard.
    """
    after_cut = any(s.test_accuracy_after_cut is not None for s in states)
    header = ["state", "remaining", "heads", "neurons", "test acc", "best epoch"]
    if after_cut:
        header.append("after cut")
    header.append("wall time")
    rows = []
    for s in states:
        row = [
            str(s.state),
            f"{100 * s.remaining:.2f}%",
            f"{sum(s.heads_kept)}/{sum(s.heads_total)}",
            f"{sum(s.neurons_kept)}/{sum(s.neurons_total)}",
            f"{100 * s.test_accuracy:.2f}%",
            str(s.best_epoch),
        ]
        if after_cut:
            row.append("" if s.test_accuracy_after_cut is None else f"{100 * s.test_accuracy_after_cut:.2f}%")
        row.append(format_duration(s.seconds))
        rows.append(row)
    return header, rows


def format_summary_markdown(states: Sequence[StateRecord]) -> str:
    """Return the state table as Markdown."""
    header, rows = state_table(states)
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def format_duration(seconds: float) -> str:
    """Return ``1m 05s`` style text for a duration in seconds."""
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m {rest:02d}s" if minutes else f"{rest}s"


def plot_accuracy(path: Path, states: Sequence[StateRecord], title: str) -> None:
    """Save a PNG of test accuracy (best validation epoch) against remaining weights, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    remaining = [100 * s.remaining for s in states]
    accuracy = [100 * s.test_accuracy for s in states]
    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    axes.plot(remaining, accuracy, marker="o", color="tab:blue", label="test accuracy at best val epoch")
    for s, x, y in zip(states, remaining, accuracy):
        axes.annotate(f"state {s.state}", (x, y), textcoords="offset points", xytext=(4, 6), fontsize=8)
    if any(s.test_accuracy_after_cut is not None for s in states):
        cut = [(100 * s.remaining, 100 * s.test_accuracy_after_cut) for s in states if s.test_accuracy_after_cut is not None]
        axes.plot([c[0] for c in cut], [c[1] for c in cut], marker="s", linestyle="--", color="tab:orange",
                  label="test accuracy after the hard cut")
    axes.margins(x=0.08, y=0.15)
    axes.invert_xaxis()
    axes.set_xlabel("remaining prunable weights (%)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    write_bytes_atomic(path, buffer.getvalue())
