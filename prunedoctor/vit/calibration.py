"""Calibration batches for the activation criteria of ``prune`` (l1, l2, saliency).

Images come from :func:`prunedoctor.data.load_dataset`: CIFAR-10/100 python
batches or an image-folder layout (a folder or a ``.tar.gz`` of
``train/<class>/<image>``). They are scaled to [0, 1], normalised with the
per-channel mean and standard deviation of the images read, and resized to
the model's input size when it differs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prunedoctor.errors import DataError
from prunedoctor.vit.arch import VitArchitecture

if TYPE_CHECKING:
    import torch

__all__ = ["CALIBRATION_DATASETS", "CalibrationData", "detect_dataset_kind", "load_calibration_batches"]

_logger = logging.getLogger(__name__)

CALIBRATION_DATASETS = ("auto", "cifar10", "cifar100", "image-folder")


@dataclass
class CalibrationData:
    """Calibration batches and where they came from.

    Attributes:
        batches: ``(images, labels)`` pairs; images are float32 ``[B, C, S, S]``.
        dataset: Data set kind that was read.
        source: File or folder read.
        images: Number of images in all batches.
        resized_from: Original image side when the images were resized, else None.
    """

    batches: list[tuple[torch.Tensor, torch.Tensor]]
    dataset: str
    source: str
    images: int
    resized_from: int | None = None


def detect_dataset_kind(path: Path) -> str:
    """Return ``cifar10``, ``cifar100`` or ``image-folder`` from the files at ``path``."""
    if path.is_dir():
        if (path / "cifar-10-batches-py").is_dir() or (path / "data_batch_1").is_file():
            return "cifar10"
        if (path / "cifar-100-python").is_dir() or ((path / "train").is_file() and (path / "meta").is_file()):
            return "cifar100"
    return "image-folder"


def load_calibration_batches(
    path: str | Path,
    arch: VitArchitecture,
    *,
    batches: int,
    batch_size: int,
    dataset: str = "auto",
) -> CalibrationData:
    """Read ``batches * batch_size`` training images and labels as model-ready batches.

    Args:
        path: CIFAR folder (containing ``cifar-10-batches-py`` or the batch
            files themselves) or image folder / archive.
        arch: Architecture of the model, for the input size and channels.
        batches: Number of batches.
        batch_size: Images per batch.
        dataset: ``auto`` to detect the kind from the files, or a kind from
            :data:`CALIBRATION_DATASETS`.

    Raises:
        DataError: The data is missing, has too few images, the wrong number
            of channels, or labels outside the classifier.
    """
    import torch
    import torch.nn.functional as F

    from prunedoctor.data import load_dataset

    if batches < 1 or batch_size < 1:
        raise DataError(f"--calib-batches and --batch-size must be at least 1, got {batches} and {batch_size}")
    if dataset not in CALIBRATION_DATASETS:
        raise DataError(f"unknown data set kind {dataset!r}; choose one of {', '.join(CALIBRATION_DATASETS)}")
    location = Path(path).expanduser()
    if not location.exists():
        raise DataError(f"{location}: calibration data not found; pass --data with a CIFAR folder or an image folder")
    kind = detect_dataset_kind(location) if dataset == "auto" else dataset
    requested = batches * batch_size
    # One image is held out as the validation split, which calibration does not use.
    splits = load_dataset(kind, location, val_size=1, subset=requested)
    train = splits.train
    if len(train) < requested:
        _logger.warning("%s has %d training images, fewer than the %d requested; using all of them",
                        splits.source, len(train), requested)
    if splits.channels != arch.in_chans:
        raise DataError(
            f"{splits.source}: images have {splits.channels} channel{'s' if splits.channels != 1 else ''} but "
            f"the model takes {arch.in_chans}"
        )
    labels = torch.from_numpy(train.labels)
    if arch.num_classes and int(labels.max()) >= arch.num_classes:
        raise DataError(
            f"{splits.source}: label {int(labels.max())} is outside the classifier's {arch.num_classes} classes; "
            "calibrate with the data set the model was trained on"
        )
    mean = torch.tensor(splits.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(splits.std, dtype=torch.float32).view(1, -1, 1, 1)
    result: list[tuple[torch.Tensor, torch.Tensor]] = []
    resized_from = splits.image_size if splits.image_size != arch.img_size else None
    for start in range(0, len(train), batch_size):
        chunk = torch.from_numpy(train.images[start : start + batch_size]).permute(0, 3, 1, 2).float() / 255.0
        chunk = (chunk - mean) / std
        if resized_from is not None:
            chunk = F.interpolate(chunk, size=(arch.img_size, arch.img_size), mode="bilinear", antialias=True,
                                  align_corners=False)
        result.append((chunk.contiguous(), labels[start : start + batch_size]))
    return CalibrationData(result, kind, splits.source, len(train), resized_from)
