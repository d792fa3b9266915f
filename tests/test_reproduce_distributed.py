"""``torchrun`` with two CPU processes (gloo) on a tiny configuration."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_reproduce import run_once

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"real CIFAR-10 archive not found at {ARCHIVE}"),
]

HASH_LINE = re.compile(r"rank (\d): state (\d) masks sha256\s+([0-9a-f]{64})")


def _build_ddp(folder: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTEST_XDIST_WORKER"):
        env.pop(name, None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "prunedoctor", "reproduce",
        "--dataset", "image-folder", "--data-dir", str(ARCHIVE), "--model", "vit-micro",
        "--subset", "512", "--val-size", "128", "--batch-size", "32", "--epochs", "1", "--iters", "3",
        "--device", "cpu", "--threads", "1", "--verbose", "--out", str(folder / "run"),
    ]
    completed = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    (folder / "output.txt").write_text(completed.stdout + completed.stderr)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The run folder and the combined output of both ranks (built once per session)."""
    folder = run_once(tmp_path_factory, "reproduce-ddp", _build_ddp)
    return folder / "run", (folder / "output.txt").read_text()


def test_ranks_report_identical_masks(ddp_run: tuple[Path, str]) -> None:
    """Both ranks log the same mask hash after every state, and it matches history.json."""
    run_dir, output = ddp_run
    found: dict[tuple[int, int], str] = {}
    for rank, state, digest in HASH_LINE.findall(output):
        found[(int(rank), int(state))] = digest
    states = json.loads((run_dir / "history.json").read_text())["states"]
    assert len(states) == 3
    for record in states:
        state = record["state"]
        assert found.get((0, state)) == found.get((1, state)), f"state {state}: ranks disagree"
        assert found.get((1, state)) == record["masks_sha256"], f"state {state}: rank 1 hash missing or different"


def test_log_written_by_rank_zero_only(ddp_run: tuple[Path, str]) -> None:
    run_dir, _ = ddp_run
    log = (run_dir / "log.txt").read_text()
    assert "2 processes on cpu; rank 0 writes the run folder" in log
    assert "rank 0: state 2 masks sha256" in log
    assert "rank 1:" not in log


def test_run_folder_has_one_copy_of_each_file(ddp_run: tuple[Path, str]) -> None:
    """No temporary or duplicate files are left behind by concurrent writers."""
    run_dir, _ = ddp_run
    names = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    assert [n for n in names if n.endswith(".tmp") or "/." in n or n.startswith(".")] == []
    expected_top = {"accuracy.png", "config.json", "history.csv", "history.json", "log.txt", "resume.pt", "summary.md"}
    assert {n for n in names if "/" not in n} == expected_top


def test_distributed_run_learns(ddp_run: tuple[Path, str]) -> None:
    """The 2-process run trains: state 0 beats chance on the validation images."""
    run_dir, _ = ddp_run
    epochs = json.loads((run_dir / "history.json").read_text())["epochs"]
    assert max(e["val_accuracy"] for e in epochs if e["state"] == 0) > 0.12
