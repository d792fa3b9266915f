"""Mini-batches for training and evaluation, reproducible from the seed alone.

The order of every epoch and the augmentation of every batch come from
generators seeded with ``(seed, state, epoch[, batch])``. A run resumed at any
batch therefore gets exactly the batches of an uninterrupted run, whether
batches are built in the main process or in DataLoader workers.

Training batches get the CIFAR augmentation: a random crop of the image size from the image
padded by 4 zero pixels on each side, and a horizontal flip with probability
one half. All batches are normalised per channel with the training split's
mean and standard deviation. With several processes (DistributedDataParallel)
each rank takes every ``world_size``-th image of the global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from prunedoctor.data import ImageArrays

__all__ = ["derive_seed", "SplitTensors", "TrainBatches", "iterate_eval_batches", "CROP_PADDING"]

CROP_PADDING = 4


def derive_seed(*parts: int) -> int:
    """Return a 63-bit seed that depends on every part (a hash, not a sum)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@dataclass
class SplitTensors:
    """One split as tensors: uint8 images ``[N, C, H, W]`` and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_arrays(cls, arrays: ImageArrays) -> SplitTensors:
        images = torch.from_numpy(np.ascontiguousarray(arrays.images)).permute(0, 3, 1, 2).contiguous()
        return cls(images, torch.from_numpy(arrays.labels.astype(np.int64)))

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, out_size: int) -> torch.Tensor:
    x = images.float().div_(255.0).sub_(mean).div_(std)
    if x.shape[-1] != out_size:
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False)
    return x


def _random_crop_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    count, channels, height, width = images.shape
    padded = F.pad(images, (CROP_PADDING,) * 4)
    top = torch.randint(0, 2 * CROP_PADDING + 1, (count,), generator=generator)
    left = torch.randint(0, 2 * CROP_PADDING + 1, (count,), generator=generator)
    flip = torch.rand(count, generator=generator) < 0.5
    rows = top[:, None] + torch.arange(height)[None, :]
    cols = left[:, None] + torch.arange(width)[None, :]
    # Mirror the column index instead of flipping the image afterwards.
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch_index = torch.arange(count)[:, None, None, None]
    channel_index = torch.arange(channels)[None, :, None, None]
    return padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]


class TrainBatches(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """The training batches of one epoch on one rank; item ``i`` is batch ``i``.

    The last incomplete global batch is dropped, so every rank runs the same
    number of equal-sized batches.
    """

    def __init__(
        self,
        split: SplitTensors,
        *,
        batch_size: int,
        seed: int,
        state: int,
        epoch: int,
        mean: torch.Tensor,
        std: torch.Tensor,
        out_size: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.split = split
        self.batch_size = batch_size
        self.seed, self.state, self.epoch = seed, state, epoch
        self.mean, self.std, self.out_size = mean, std, out_size
        self.rank, self.world_size = rank, world_size
        order_generator = torch.Generator().manual_seed(derive_seed(seed, state, epoch))
        self.order = torch.randperm(len(split), generator=order_generator)

    def __len__(self) -> int:
        return len(self.split) // self.batch_size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        chosen = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.state, self.epoch, index))
        # Augment the whole global batch, then keep this rank's share, so the
        # images do not depend on the number of processes.
        images = _random_crop_flip(self.split.images[chosen], generator)
        mine = slice(self.rank, None, self.world_size)
        return _normalize(images[mine], self.mean, self.std, self.out_size), self.split.labels[chosen][mine]


def iterate_batches(
    batches: TrainBatches, start: int, workers: int
) -> Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Yield ``(index, batch)`` from batch ``start`` on, built by ``workers`` processes (0: this one)."""
    indices = list(range(start, len(batches)))
    if workers <= 0:
        for index in indices:
            yield index, batches[index]
        return
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=indices, num_workers=workers)
    yield from zip(indices, loader)


def iterate_eval_batches(
    split: SplitTensors,
    *,
    batch_size: int,
    mean: torch.Tensor,
    std: torch.Tensor,
    out_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield this rank's share of a split in order, normalised and not augmented."""
    indices = torch.arange(rank, len(split), world_size)
    for start in range(0, len(indices), batch_size):
        chosen = indices[start : start + batch_size]
        yield _normalize(split.images[chosen], mean, std, out_size), split.labels[chosen]
