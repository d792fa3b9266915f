"""Kill a real ``prunedoctor reproduce`` process with SIGKILL and resume it.

The resumed run must reach the same masks, weights and accuracies as an
uninterrupted run, bit for bit, on the CPU with one thread.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_reproduce import run_once

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"real CIFAR-10 archive not found at {ARCHIVE}"),
]

RUN_ARGS = [
    "--dataset", "image-folder", "--data-dir", str(ARCHIVE), "--model", "vit-micro",
    "--subset", "384", "--val-size", "128", "--batch-size", "32", "--epochs", "2", "--iters", "3",
    "--rewind-epoch", "1", "--device", "cpu", "--threads", "1", "--save-every-batches", "3", "--quiet",
]


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "prunedoctor", "reproduce", *args]


def _environment() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_command(*args), cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=240)


def _kill_after(marker: str, args: list[str], run_dir: Path, cwd: Path) -> None:
    """Start a run, wait until ``marker`` appears in its log, then SIGKILL it."""
    process = subprocess.Popen(_command(*args), cwd=cwd, env=_environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = run_dir / "log.txt"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if log.is_file() and marker in log.read_text(encoding="utf-8"):
                break
            if process.poll() is not None:
                pytest.fail(f"run ended before {marker!r} appeared: {process.stderr.read() if process.stderr else ''}")
            time.sleep(0.02)
        else:
            pytest.fail(f"{marker!r} did not appear in {log} within 240 s")
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def _outputs(run_dir: Path) -> dict[str, object]:
    history = json.loads((run_dir / "history.json").read_text())
    accuracies = [(e["state"], e["epoch"], e["train_loss"], e["val_accuracy"], e["test_accuracy"])
                  for e in history["epochs"]]
    states = [(s["remaining"], s["masks_sha256"], s["heads_kept"], s["neurons_kept"]) for s in history["states"]]
    return {"accuracies": accuracies, "states": states}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _build_reference(folder: Path) -> None:
    completed = _run([*RUN_ARGS, "--out", str(folder / "run")], folder)
    assert completed.returncode == 0, completed.stderr


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run with the same settings (built once per session)."""
    return run_once(tmp_path_factory, "reproduce-reference", _build_reference) / "run"


@pytest.mark.parametrize(
    "marker",
    [
        "resume checkpoint saved at state 1, epoch 0, batch 6",  # inside an epoch
        "state 0 done",  # between the state's files and its checkpoint
    ],
    ids=["inside-epoch", "between-states"],
)
def test_killed_run_resumes_identically(reference_run: Path, tmp_path: Path, marker: str) -> None:
    """A run killed at the marker and resumed ends with the reference run's results."""
    run_dir = tmp_path / "run"
    _kill_after(marker, [*RUN_ARGS, "--out", str(run_dir)], run_dir, tmp_path)
    assert not (run_dir / "state_2").exists()

    resumed = _run(["--resume", str(run_dir), "--threads", "1", "--quiet"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in (run_dir / "log.txt").read_text()

    expected, actual = _outputs(reference_run), _outputs(run_dir)
    assert actual["accuracies"] == expected["accuracies"]
    assert actual["states"] == expected["states"]
    for state in range(3):
        for name in ("masks.pt", "model.pt"):
            reference = _tensors(reference_run / f"state_{state}" / name)
            result = _tensors(run_dir / f"state_{state}" / name)
            assert reference.keys() == result.keys()
            for key in reference:
                assert torch.equal(reference[key], result[key]), f"state_{state}/{name}: {key} differs"


def test_resume_rejects_new_settings(reference_run: Path, tmp_path: Path) -> None:
    """--resume with a result-changing option exits 2 and names the option."""
    completed = _run(["--resume", str(reference_run), "--lr", "0.5"], tmp_path)
    assert completed.returncode == 2
    assert "drop --lr" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_resume_of_finished_run_is_noop(reference_run: Path, tmp_path: Path) -> None:
    """Resuming a finished run trains nothing and leaves the state files unchanged."""
    before = (reference_run / "state_2" / "model.pt").stat().st_mtime_ns
    completed = _run(["--resume", str(reference_run), "--quiet"], tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert (reference_run / "state_2" / "model.pt").stat().st_mtime_ns == before
