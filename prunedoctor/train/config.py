"""The configuration of one ``reproduce`` run, saved as ``config.json`` in the run folder."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from prunedoctor.errors import PrunedoctorError

__all__ = [
    "RunConfig",
    "CRITERIA",
    "SORTINGS",
    "TARGETS",
    "METHODS",
    "RSST_SCHEDULES",
    "LR_SCHEDULES",
    "DEVICES",
    "validate_config",
]

CRITERIA = ("magnitude", "remain", "l1", "l2", "saliency")
SORTINGS = ("global", "layer-wise")
TARGETS = ("both", "head", "mlp")
METHODS = ("refill", "rsst")
RSST_SCHEDULES = ("x", "x^2", "x^3", "exp", "exp_custom_exponents")
LR_SCHEDULES = ("cosine", "multistep")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RunConfig:
    """Every setting that determines a run's results.

    The defaults are the quick test that users of Refill run first: three
    states of two epochs, global sorting, rate 0.3, heads and MLP neurons.
    Output paths, devices, checkpointing and display settings are not part of
    it, so that a resumed run may change them.
    """

    dataset: str = "cifar10"
    data_dir: str | None = None
    val_size: int = 5000
    subset: int | None = None
    model: str = "vit-demo"
    img_size: int | None = None
    iters: int = 3
    epochs: int = 2
    rate: float = 0.3
    criterion: str = "magnitude"
    sorting: str = "global"
    target: str = "both"
    refill_rate: float = 0.0
    method: str = "refill"
    rsst_schedule: str = "exp_custom_exponents"
    rsst_granularity: float = 1.0
    rsst_exponent: float = 4.0
    rewind_epoch: int = 0
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-5
    batch_size: int = 128
    warmup_epochs: float = 0.5
    lr_schedule: str = "cosine"
    calibration_batches: int = 4
    seed: int = 0
    amp: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build a config from ``config.json`` content, rejecting unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PrunedoctorError(f"config.json has unknown settings {unknown}; it was written by another version")
        return cls(**data)


def validate_config(config: RunConfig) -> None:
    """Raise PrunedoctorError naming the first invalid option and its allowed values."""
    choices = {
        "--criterion": (config.criterion, CRITERIA),
        "--sorting": (config.sorting, SORTINGS),
        "--target": (config.target, TARGETS),
        "--method": (config.method, METHODS),
        "--rsst-schedule": (config.rsst_schedule, RSST_SCHEDULES),
        "--lr-schedule": (config.lr_schedule, LR_SCHEDULES),
    }
    for option, (value, allowed) in choices.items():
        if value not in allowed:
            raise PrunedoctorError(f"{option} {value!r} is invalid; choose one of {', '.join(allowed)}")

    positive_ints = {
        "--iters": config.iters,
        "--epochs": config.epochs,
        "--batch-size": config.batch_size,
        "--val-size": config.val_size,
    }
    for option, value in positive_ints.items():
        if value < 1:
            raise PrunedoctorError(f"{option} must be at least 1, got {value}")

    if not 0.0 < config.rate < 1.0:
        raise PrunedoctorError(f"--rate must be between 0 and 1 (the fraction pruned per state), got {config.rate}")
    if not 0.0 <= config.refill_rate <= 1.0:
        raise PrunedoctorError(f"--refill-rate must be between 0 and 1, got {config.refill_rate}")
    if not 0 <= config.rewind_epoch < config.epochs:
        raise PrunedoctorError(
            f"--rewind-epoch must be between 0 (the initial weights) and --epochs - 1 = {config.epochs - 1}, "
            f"got {config.rewind_epoch}"
        )

    if config.lr <= 0:
        raise PrunedoctorError(f"--lr must be positive, got {config.lr}")
    if not 0.0 <= config.momentum < 1.0:
        raise PrunedoctorError(f"--momentum must be in [0, 1), got {config.momentum}")
    if config.weight_decay < 0:
        raise PrunedoctorError(f"--weight-decay must not be negative, got {config.weight_decay}")
    if not 0.0 <= config.warmup_epochs <= config.epochs:
        raise PrunedoctorError(
            f"--warmup-epochs must be between 0 and --epochs ({config.epochs}), got {config.warmup_epochs}"
        )

    if config.rsst_granularity < 0:
        raise PrunedoctorError(f"--rsst-granularity must not be negative, got {config.rsst_granularity}")
    if config.rsst_exponent <= 0:
        raise PrunedoctorError(f"--rsst-exponent must be positive, got {config.rsst_exponent}")

    if config.subset is not None and config.subset < 1:
        raise PrunedoctorError(f"--subset must be at least 1, got {config.subset}")
    if config.img_size is not None and config.img_size < 1:
        raise PrunedoctorError(f"--img-size must be at least 1, got {config.img_size}")
    if config.calibration_batches < 1:
        raise PrunedoctorError(f"--calibration-batches must be at least 1, got {config.calibration_batches}")
