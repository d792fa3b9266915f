"""Data sets for ``reproduce``: CIFAR batches, image folders (folder or archive), IDX files, splits."""

from __future__ import annotations

import gzip
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prunedoctor.data import (
    FASHION_MNIST_DIR,
    load_dataset,
    read_cifar_batches,
    read_idx_file,
    read_image_folder,
)
from prunedoctor.errors import DataError

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
CLASSES = ["cat", "dog", "frog"]


def _write_image_folder(root: Path, per_class: dict[str, int], size: int = 8) -> None:
    """Write PNG files whose red channel encodes (class index, file index)."""
    for split, count in per_class.items():
        for label, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = np.zeros((size, size, 3), dtype=np.uint8)
                pixels[..., 0] = label
                pixels[..., 1] = index
                Image.fromarray(pixels).save(folder / f"{index:04d}.png")


def _write_cifar(folder: Path, per_batch: int = 20) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, size=per_batch)),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


# --- image folders ---------------------------------------------------------------


def test_image_folder_interleaves_classes(tmp_path: Path) -> None:
    """Images come round-robin over the classes: file 0 of each class, then file 1, ..."""
    _write_image_folder(tmp_path, {"train": 4, "test": 2})
    train, _, classes = read_image_folder(tmp_path)
    assert classes == CLASSES
    assert train.labels.tolist() == [0, 1, 2] * 4
    assert train.images[:, 0, 0, 1].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_image_folder_reads_archive(tmp_path: Path) -> None:
    """A .tar.gz with a leading folder gives the same arrays as the folder itself."""
    source = tmp_path / "images"
    _write_image_folder(source, {"train": 3, "test": 2})
    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="cifar-like")
    from_folder = read_image_folder(source)
    from_archive = read_image_folder(archive)
    assert np.array_equal(from_folder[0].images, from_archive[0].images)
    assert np.array_equal(from_folder[1].labels, from_archive[1].labels)


def test_validation_split_is_last_images(tmp_path: Path) -> None:
    _write_image_folder(tmp_path, {"train": 4, "test": 2})
    splits = load_dataset("image-folder", tmp_path, val_size=3)
    assert len(splits.train) == 9
    assert len(splits.val) == 3
    assert splits.val.images[:, 0, 0, 1].tolist() == [3, 3, 3]
    assert splits.val.labels.tolist() == [0, 1, 2]


def test_subset_caps_every_split(tmp_path: Path) -> None:
    _write_image_folder(tmp_path, {"train": 5, "test": 4})
    splits = load_dataset("image-folder", tmp_path, val_size=6, subset=4)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4, 4, 4)


def test_channel_statistics_in_unit_range(tmp_path: Path) -> None:
    _write_image_folder(tmp_path, {"train": 4, "test": 1})
    splits = load_dataset("image-folder", tmp_path, val_size=3)
    red = splits.train.images[..., 0].astype(np.float64) / 255
    assert splits.mean[0] == pytest.approx(red.mean())
    assert splits.std[0] == pytest.approx(red.std(), rel=1e-6)


def test_image_folder_needs_data_dir() -> None:
    with pytest.raises(DataError, match="image-folder needs --data-dir"):
        load_dataset("image-folder")


def test_image_folder_class_mismatch(tmp_path: Path) -> None:
    _write_image_folder(tmp_path, {"train": 2, "test": 2})
    for file in (tmp_path / "test" / "frog").iterdir():
        file.unlink()
    (tmp_path / "test" / "frog").rmdir()
    with pytest.raises(DataError, match=r"different classes \(only in train: \['frog'\]"):
        load_dataset("image-folder", tmp_path, val_size=1)


def test_image_folder_missing_split(tmp_path: Path) -> None:
    _write_image_folder(tmp_path, {"train": 2})
    with pytest.raises(DataError, match="has no test/<class>/<image> files"):
        load_dataset("image-folder", tmp_path, val_size=1)


def test_corrupt_image_names_file(tmp_path: Path) -> None:
    _write_image_folder(tmp_path, {"train": 2, "test": 1})
    (tmp_path / "train" / "cat" / "0000.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cannot decode image .*cat/0000\.png"):
        load_dataset("image-folder", tmp_path, val_size=1)


def test_val_size_too_large(tmp_path: Path) -> None:
    _write_image_folder(tmp_path, {"train": 2, "test": 1})
    with pytest.raises(DataError, match="--val-size 6 leaves no training images"):
        load_dataset("image-folder", tmp_path, val_size=6)


# --- CIFAR batches -------------------------------------------------------------


def test_cifar_batches_layout(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "cifar-10-batches-py")
    (train_images, train_labels), (test_images, _), classes = read_cifar_batches(tmp_path / "cifar-10-batches-py")
    assert train_images.shape == (100, 32, 32, 3)
    assert train_labels.shape == (100,)
    assert test_images.shape == (20, 32, 32, 3)
    assert classes[0] == "airplane"


def test_cifar_rows_are_channel_planes(tmp_path: Path) -> None:
    """A CIFAR row contains the red plane, then the green, then the blue."""
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    raw = pickle.loads((folder / "data_batch_1").read_bytes())[b"data"][0]
    (train_images, _), _, _ = read_cifar_batches(folder)
    assert train_images[0, 0, 1, 0] == raw[1]
    assert train_images[0, 0, 0, 2] == raw[2048]


def test_cifar_found_below_data_dir(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "cifar-10-batches-py")
    splits = load_dataset("cifar10", tmp_path, val_size=10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 20)


def test_cifar_missing_names_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"CIFAR-10 not found: looked for .*cifar-10-batches-py/data_batch_1.*--download"):
        load_dataset("cifar10", tmp_path)


def test_cifar_missing_batch(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3 is missing"):
        load_dataset("cifar10", tmp_path)


def test_cifar100_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="CIFAR-100 not found.*cifar-100-python"):
        load_dataset("cifar100", tmp_path)


# --- IDX files ------------------------------------------------------------------


def test_idx_round_trip(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "images-idx3-ubyte.gz", array)
    assert np.array_equal(read_idx_file(tmp_path / "images-idx3-ubyte.gz"), array)


def test_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(DataError, match="not an IDX file: invalid magic number 01020304"):
        read_idx_file(path)


def test_idx_truncated(tmp_path: Path) -> None:
    path = tmp_path / "short-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 4)
    with pytest.raises(DataError, match=r"dimensions \(10,\) need 10 data bytes, the file has 4"):
        read_idx_file(path)


def test_fashion_mnist_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (30, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 30))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (5, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 5))
    splits = load_dataset("fashion-mnist", tmp_path, val_size=10)
    assert splits.train.images.shape == (20, 28, 28, 1)
    assert splits.channels == 1
    assert len(splits.classes) == 10


def test_fashion_mnist_missing_names_package(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path)


def test_unknown_dataset() -> None:
    with pytest.raises(DataError, match="unknown data set 'mnist'"):
        load_dataset("mnist")


# --- the real data sets, where present ---------------------------------------------


@pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"real CIFAR-10 archive not found at {ARCHIVE}")
def test_real_cifar10_archive_subset() -> None:
    splits = load_dataset("image-folder", ARCHIVE, val_size=1000, subset=500)
    assert splits.classes[0] == "airplane"
    assert len(splits.classes) == 10
    assert splits.train.images.shape == (500, 32, 32, 3)
    assert np.bincount(splits.val.labels, minlength=10).tolist() == [50] * 10
    assert 0.4 < splits.mean[0] < 0.6


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist() -> None:
    splits = load_dataset("fashion-mnist", subset=100)
    assert splits.train.images.shape == (100, 28, 28, 1)
    assert len(splits.val) == 100
    assert splits.classes[9] == "ankle boot"
