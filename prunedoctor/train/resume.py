"""Resume checkpoints: everything a killed run needs to continue bit for bit.

``RUN_DIR/resume.pt`` is rewritten atomically every ``--save-every-batches``
batches, at the end of every epoch and after every state. It contains the model
with its ``*_orig``/``*_mask`` pairs, the optimizer and learning-rate schedule,
the masks, the RSST penalty masks and the rewind point. It also contains the
heads and neurons kept, the epoch's running sums, the history, the random
number generator states and the position of the next batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunedoctor.errors import CheckpointError
from prunedoctor.train.outputs import save_torch_atomic

__all__ = [
    "RESUME_FORMAT",
    "RESUME_FILE",
    "Position",
    "capture_rng_state",
    "restore_rng_state",
    "save_resume_checkpoint",
    "load_resume_checkpoint",
]

RESUME_FORMAT = "prunedoctor-reproduce-resume/1"
RESUME_FILE = "resume.pt"
_REQUIRED_KEYS = (
    "format", "config", "position", "model", "optimizer", "scheduler", "masks", "rewind",
    "kept_heads", "kept_neurons", "sums", "epochs", "states", "rng", "state_seconds",
)


@dataclass(frozen=True)
class Position:
    """Position of the next batch: state, epoch and batch index.

    ``epoch == epochs`` means that the state's training is done and its
    pruning step is next; ``finished`` means that the whole run is done.
    """

    state: int
    epoch: int
    batch: int
    finished: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "epoch": self.epoch, "batch": self.batch, "finished": self.finished}


def capture_rng_state() -> dict[str, Any]:
    """Return the states of the torch, CUDA, numpy and Python random number generators."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the generator states that :func:`capture_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_resume_checkpoint(run_dir: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``RUN_DIR/resume.pt`` atomically and return the path."""
    path = run_dir / RESUME_FILE
    save_torch_atomic({"format": RESUME_FORMAT, **payload}, path)
    return path


def load_resume_checkpoint(run_dir: Path) -> dict[str, Any]:
    """Read and check ``RUN_DIR/resume.pt``.

    The file contains numpy and Python generator states, so it is read with
    ``weights_only=False``: resume only run folders that you created.

    Raises:
        CheckpointError: The file is missing, unreadable or not a resume checkpoint.
    """
    path = run_dir / RESUME_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: {run_dir} is not a reproduce run folder, or it was killed before its first "
            "checkpoint; start it again without --resume"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != RESUME_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not a resume checkpoint of this version (format {found!r}, expected {RESUME_FORMAT!r})")
    missing = sorted(key for key in _REQUIRED_KEYS if key not in payload)
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; the file is incomplete")
    return payload
