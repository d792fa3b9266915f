"""Create, check and reopen a run folder, and attach its log file."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from prunedoctor.errors import OutputExistsError, PrunedoctorError
from prunedoctor.train.config import RunConfig, validate_config
from prunedoctor.train.distributed import DistributedContext
from prunedoctor.train.events import RunOptions
from prunedoctor.train.outputs import write_text_atomic
from prunedoctor.train.resume import RESUME_FILE, load_resume_checkpoint

__all__ = ["open_run_dir", "create_run_dir", "remove_run_outputs", "list_run_outputs", "attach_run_log"]

# Files that a fresh run with --force removes before it starts, so that no
# output of an older run in the same folder is mistaken for this one's.
_RUN_FILES = ("config.json", RESUME_FILE, "history.json", "history.csv", "summary.md", "accuracy.png", "log.txt")


def open_run_dir(options: RunOptions, context: DistributedContext) -> tuple[RunConfig, dict[str, Any] | None]:
    """Return the run's settings and, when resuming, its resume checkpoint, writing nothing.

    A fresh run needs a missing or empty folder, or ``force``. A resumed run
    reads ``config.json`` and ``resume.pt`` from the folder.

    Raises:
        OutputExistsError: The folder has files and ``force`` was not given.
        PrunedoctorError: The settings are invalid or the folder cannot be resumed.
        CheckpointError: ``resume.pt`` is missing or unreadable.
    """
    run_dir = options.run_dir
    if options.resume:
        config_path = run_dir / "config.json"
        if not config_path.is_file():
            raise PrunedoctorError(
                f"cannot resume {run_dir}: {config_path} not found; pass the folder that a reproduce run "
                "wrote with --out"
            )
        try:
            config = RunConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as error:
            raise PrunedoctorError(f"cannot resume {run_dir}: {config_path} is invalid: {error}") from error
        validate_config(config)
        return config, load_resume_checkpoint(run_dir)

    config = options.config
    validate_config(config)
    if context.is_main:
        if run_dir.exists() and not run_dir.is_dir():
            raise OutputExistsError(f"--out {run_dir} is a file; pass a folder for the run")
        if run_dir.is_dir() and any(run_dir.iterdir()) and not options.force:
            raise OutputExistsError(
                f"run folder {run_dir} exists and is not empty; pass --force to start over in it, "
                f"--resume {run_dir} to continue it, or another --out"
            )
    return config, None


def create_run_dir(options: RunOptions, config: RunConfig, context: DistributedContext) -> None:
    """Create the folder of a fresh run and write ``config.json`` (rank 0; every rank waits).

    With ``force``, the files of an earlier run in the folder are removed first.
    """
    run_dir = options.run_dir
    if context.is_main:
        if options.force and run_dir.is_dir():
            remove_run_outputs(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.json", config.to_json())
    context.barrier()


def remove_run_outputs(run_dir: Path) -> None:
    """Delete the files and ``state_*`` folders that a run writes; other files stay."""
    for name in _RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for folder in run_dir.glob("state_*"):
        if folder.is_dir():
            shutil.rmtree(folder)


def list_run_outputs(run_dir: Path) -> list[Path]:
    """Return every file that a run writes and that exists in ``run_dir``, sorted; other files are left out."""
    files = [run_dir / name for name in _RUN_FILES if (run_dir / name).is_file()]
    for folder in sorted(run_dir.glob("state_*")):
        if folder.is_dir():
            files += sorted(path for path in folder.rglob("*") if path.is_file())
    return files


def attach_run_log(run_dir: Path) -> logging.Handler:
    """Send the package's log records from INFO up to ``RUN_DIR/log.txt`` (appending) and return the handler."""
    handler = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("prunedoctor")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler
