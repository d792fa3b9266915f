"""Training and evaluation batches: augmentation, seeding, sharding over ranks."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunedoctor.data import ImageArrays
from prunedoctor.train.batches import CROP_PADDING, SplitTensors, TrainBatches, derive_seed, iterate_eval_batches


def _split(count: int = 40, size: int = 8) -> SplitTensors:
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(count, size, size, 3), dtype=np.uint8)
    return SplitTensors.from_arrays(ImageArrays(images, np.arange(count) % 10))


def _batches(split: SplitTensors, **overrides: int) -> TrainBatches:
    settings_ = {"batch_size": 8, "seed": 0, "state": 0, "epoch": 0, "rank": 0, "world_size": 1}
    settings_.update(overrides)
    # Identity normalisation (mean 0, std 1/255) keeps pixel values visible.
    return TrainBatches(split, mean=torch.zeros(3, 1, 1), std=torch.full((3, 1, 1), 1 / 255), out_size=8, **settings_)


def _windows(image: torch.Tensor) -> list[torch.Tensor]:
    padded = torch.nn.functional.pad(image, (CROP_PADDING,) * 4)
    size = image.shape[-1]
    crops = []
    for top in range(2 * CROP_PADDING + 1):
        for left in range(2 * CROP_PADDING + 1):
            crop = padded[:, top : top + size, left : left + size]
            crops += [crop, crop.flip(-1)]
    return crops


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), index=st.integers(0, 4))
def test_augmented_image_is_padded_crop(seed: int, index: int) -> None:
    """Every training image is a window of the zero-padded original, possibly mirrored."""
    split = _split()
    batches = _batches(split, seed=seed)
    images, labels = batches[index]
    chosen = batches.order[index * 8 : (index + 1) * 8]
    for position, source in enumerate(chosen):
        original = split.images[source].float()
        pixels = images[position].round()
        assert any(torch.equal(pixels, window) for window in _windows(original))
        assert int(labels[position]) == int(split.labels[source])


def test_batches_repeat_for_same_seed() -> None:
    first = _batches(_split(), seed=3)[2]
    second = _batches(_split(), seed=3)[2]
    assert torch.equal(first[0], second[0])


def test_epochs_get_new_order() -> None:
    split = _split()
    assert not torch.equal(_batches(split, epoch=0).order, _batches(split, epoch=1).order)


def test_ranks_share_global_batch() -> None:
    """Two ranks together see exactly the images of one process's batch."""
    split = _split()
    whole, _ = _batches(split, world_size=1)[1]
    rank0, _ = _batches(split, rank=0, world_size=2)[1]
    rank1, _ = _batches(split, rank=1, world_size=2)[1]
    assert torch.equal(whole[0::2], rank0)
    assert torch.equal(whole[1::2], rank1)


def test_last_partial_batch_dropped() -> None:
    assert len(_batches(_split(count=41))) == 5


def test_eval_batches_cover_split_in_order() -> None:
    split = _split(count=13)
    labels = torch.cat([y for _, y in iterate_eval_batches(
        split, batch_size=5, mean=torch.zeros(3, 1, 1), std=torch.ones(3, 1, 1), out_size=8)])
    assert labels.tolist() == split.labels.tolist()


def test_derive_seed_depends_on_order() -> None:
    assert derive_seed(1, 2) != derive_seed(2, 1)


def test_worker_processes_build_same_batches() -> None:
    """Batches built by DataLoader workers equal those built in the main process."""
    from prunedoctor.train.batches import iterate_batches

    batches = _batches(_split())
    main = [(index, batch[0]) for index, batch in iterate_batches(batches, 1, workers=0)]
    workers = [(index, batch[0]) for index, batch in iterate_batches(batches, 1, workers=2)]
    assert [i for i, _ in main] == [i for i, _ in workers] == [1, 2, 3, 4]
    for (_, expected), (_, actual) in zip(main, workers):
        assert torch.equal(expected, actual)
