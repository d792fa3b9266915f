"""Image classification data sets for ``prunedoctor reproduce``.

Four sources give uint8 images in memory, decoded once per process:

- ``cifar10`` / ``cifar100``: the pickled python batches (``cifar-10-batches-py``,
  ``cifar-100-python``) that torchvision downloads;
- ``image-folder``: ``train/<class>/<file>`` and ``test/<class>/<file>`` in a
  folder or read straight from a ``.tar.gz`` / ``.tar`` archive;
- ``fashion-mnist``: the gzipped IDX files, found in Debian's location
  (``/usr/share/datasets/fashion-mnist``) by default.

The validation split is the last ``val_size`` images of the training set, as
in Structure-LTH. Image folders list files class by class, so their
images are first interleaved round-robin over the classes: the first image of
every class, then the second, and so on. The validation split and a
``subset`` then have every class in about equal share.
"""

from __future__ import annotations

import gzip
import io
import logging
import pickle
import struct
import tarfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from prunedoctor.errors import DataError

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_DATA_DIRS",
    "FASHION_MNIST_DIR",
    "ImageArrays",
    "DatasetSplits",
    "load_dataset",
    "read_cifar_batches",
    "read_image_folder",
    "read_idx_file",
    "read_fashion_mnist",
]

_logger = logging.getLogger(__name__)

DATASET_NAMES = ("cifar10", "cifar100", "image-folder", "fashion-mnist")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Default folder of each data set when --data-dir is not given. ``data`` is
# torchvision's usual download root, relative to the working directory.
DEFAULT_DATA_DIRS: dict[str, Path | None] = {
    "cifar10": Path("data"),
    "cifar100": Path("data"),
    "image-folder": None,
    "fashion-mnist": FASHION_MNIST_DIR,
}
FASHION_MNIST_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
_DECODE_THREADS = 4


@dataclass(frozen=True)
class ImageArrays:
    """Images and labels of one split.

    Attributes:
        images: uint8 array of shape ``[N, H, W, C]``.
        labels: int64 array of shape ``[N]`` with class indices.
    """

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class DatasetSplits:
    """Train, validation and test splits of a data set, with its normalisation.

    Attributes:
        name: Data set name from :data:`DATASET_NAMES`.
        source: File or folder that the images were read from.
        classes: Class names, indexed by label.
        train: Training split (validation images removed, ``subset`` applied).
        val: Validation split, held out of the training set.
        test: Test split.
        mean: Per-channel mean of the training split, in [0, 1] units.
        std: Per-channel standard deviation of the training split, in [0, 1] units.
    """

    name: str
    source: str
    classes: list[str]
    train: ImageArrays
    val: ImageArrays
    test: ImageArrays
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_size(self) -> int:
        """Height (equal to the width) of the images in pixels."""
        return int(self.train.images.shape[1])

    @property
    def channels(self) -> int:
        """Number of colour channels (3 for RGB, 1 for grayscale)."""
        return int(self.train.images.shape[3])


class _SplitSource:
    """Labels of one split, with images taken on request (decoded lazily for image folders)."""

    def __init__(self, labels: np.ndarray, take: Callable[[np.ndarray], np.ndarray]) -> None:
        self.labels = labels
        self._take = take

    def take(self, indices: np.ndarray) -> ImageArrays:
        return ImageArrays(self._take(indices), self.labels[indices].astype(np.int64))


def _array_source(images: np.ndarray, labels: np.ndarray) -> _SplitSource:
    return _SplitSource(labels.astype(np.int64), lambda idx: images[idx])


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = False,
    val_size: int = 5000,
    subset: int | None = None,
) -> DatasetSplits:
    """Load a data set and split it into train, validation and test images.

    Args:
        name: One of :data:`DATASET_NAMES`.
        data_dir: Folder (or archive, for ``image-folder``) to read; the entry of
            :data:`DEFAULT_DATA_DIRS` when None.
        download: Fetch CIFAR or Fashion-MNIST with torchvision into ``data_dir``
            when it is missing. Nothing is downloaded without it.
        val_size: Number of images held out of the end of the training set.
        subset: Keep only the first ``subset`` training images, and at most
            ``subset`` validation and test images, for quick runs.

    Returns:
        The splits and the per-channel normalisation of the training images.

    Raises:
        DataError: The data set is missing, unreadable or too small for the split.
    """
    if name not in DATASET_NAMES:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if val_size < 1:
        raise DataError(f"--val-size must be at least 1, got {val_size}")
    if subset is not None and subset < 1:
        raise DataError(f"--subset must be at least 1, got {subset}")
    location = _resolve_data_dir(name, data_dir)
    if name in ("cifar10", "cifar100"):
        if download:
            _download_torchvision(name, location)
        train_src, test_src, classes, source = _cifar_sources(location, cifar100=name == "cifar100")
    elif name == "fashion-mnist":
        if download:
            _download_torchvision(name, location)
        train_src, test_src, classes, source = _fashion_mnist_sources(location)
    else:
        if download:
            raise DataError("--download works for cifar10, cifar100 and fashion-mnist, not for image-folder")
        train_src, test_src, classes, source = _image_folder_sources(location)
    return _split(name, source, classes, train_src, test_src, val_size, subset)


def _resolve_data_dir(name: str, data_dir: str | Path | None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    default = DEFAULT_DATA_DIRS[name]
    if default is None:
        raise DataError(
            "--dataset image-folder needs --data-dir: a folder with train/<class>/ and test/<class>/ "
            "image folders, or a .tar.gz archive of one"
        )
    return default


def _split(
    name: str,
    source: str,
    classes: list[str],
    train_src: _SplitSource,
    test_src: _SplitSource,
    val_size: int,
    subset: int | None,
) -> DatasetSplits:
    total = len(train_src.labels)
    if val_size >= total:
        raise DataError(
            f"--val-size {val_size} leaves no training images: {source} has {total} training images; "
            "choose a smaller --val-size"
        )
    train_end = total - val_size
    train_count = train_end if subset is None else min(subset, train_end)
    val_count = val_size if subset is None else min(subset, val_size)
    test_total = len(test_src.labels)
    test_count = test_total if subset is None else min(subset, test_total)
    if test_count == 0:
        raise DataError(f"{source} has no test images")

    train = train_src.take(np.arange(train_count))
    val = train_src.take(np.arange(train_end, train_end + val_count))
    test = test_src.take(np.arange(test_count))
    _check_shapes(source, train, val, test)
    mean, std = _channel_statistics(train.images)
    _logger.info(
        "loaded %s from %s: %d train, %d validation, %d test images of %dx%d, %d classes",
        name, source, len(train), len(val), len(test), train.images.shape[1], train.images.shape[2], len(classes),
    )
    return DatasetSplits(name, source, classes, train, val, test, mean, std)


def _check_shapes(source: str, *splits: ImageArrays) -> None:
    shapes = {tuple(s.images.shape[1:]) for s in splits}
    if len(shapes) != 1:
        raise DataError(f"{source}: splits have different image shapes {sorted(shapes)}; resize the images to one size")
    height, width, _ = shapes.pop()
    if height != width:
        raise DataError(f"{source}: images are {height}x{width}; only square images are supported")


def _channel_statistics(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    # Sums in float64 per channel: exact enough for 45,000 32x32 images and
    # without a float copy of the whole array.
    channels = images.shape[3]
    flat = images.reshape(-1, channels)
    count = flat.shape[0]
    mean = flat.sum(axis=0, dtype=np.float64) / count
    square = np.zeros(channels, dtype=np.float64)
    for c in range(channels):
        column = flat[:, c].astype(np.float64)
        square[c] = float(np.dot(column, column)) / count
    std = np.sqrt(np.maximum(square - mean**2, 1e-12))
    return tuple(float(m) / 255.0 for m in mean), tuple(float(s) / 255.0 for s in std)


# --- CIFAR python batches ---------------------------------------------------------


def _cifar_sources(location: Path, *, cifar100: bool) -> tuple[_SplitSource, _SplitSource, list[str], str]:
    folder_name = "cifar-100-python" if cifar100 else "cifar-10-batches-py"
    marker = "train" if cifar100 else "data_batch_1"
    candidates = [location / folder_name, location]
    for folder in candidates:
        if (folder / marker).is_file():
            train, test, classes = read_cifar_batches(folder, cifar100=cifar100)
            return _array_source(*train), _array_source(*test), classes, str(folder)
    looked = " and ".join(str(c / marker) for c in candidates)
    label = "CIFAR-100" if cifar100 else "CIFAR-10"
    raise DataError(
        f"{label} not found: looked for {looked}; pass --data-dir with the folder that contains "
        f"{folder_name}, add --download to fetch it with torchvision, or use --dataset image-folder "
        "with a train/ and test/ image folder"
    )


def read_cifar_batches(
    folder: Path, *, cifar100: bool = False
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], list[str]]:
    """Read the pickled CIFAR batches in ``folder``.

    The batches are pickles of numpy arrays, as the CIFAR authors distribute
    them. Python's ``pickle`` can run code while it reads a file, so read only
    files from that distribution.

    Returns:
        ``(train_images, train_labels)``, ``(test_images, test_labels)`` with
        images as uint8 ``[N, 32, 32, 3]``, and the class names.

    Raises:
        DataError: A batch is missing or does not have the CIFAR layout.
    """
    if cifar100:
        train_files, test_files, label_key, meta_file, names_key = ["train"], ["test"], b"fine_labels", "meta", b"fine_label_names"
    else:
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, label_key, meta_file, names_key = ["test_batch"], b"labels", "batches.meta", b"label_names"
    train = _read_cifar_files(folder, train_files, label_key)
    test = _read_cifar_files(folder, test_files, label_key)
    meta = _unpickle(folder / meta_file) if (folder / meta_file).is_file() else {}
    names = meta.get(names_key)
    if names:
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    else:
        classes = [str(i) for i in range(int(train[1].max()) + 1)]
    return train, test, classes


def _read_cifar_files(folder: Path, names: Sequence[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DataError(f"CIFAR batch {path} is missing; download the full data set again or add --download")
        batch = _unpickle(path)
        if b"data" not in batch or label_key not in batch:
            raise DataError(f"{path} is not a CIFAR batch: it has no {b'data'!r} or {label_key!r} entry")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{path}: expected rows of 3072 bytes (3x32x32), got shape {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _unpickle(path: Path) -> dict[bytes, Any]:
    try:
        with path.open("rb") as handle:
            result = pickle.load(handle, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as error:
        raise DataError(f"cannot read {path}: {error}") from error
    if not isinstance(result, dict):
        raise DataError(f"{path} is not a CIFAR batch: it contains a {type(result).__name__}, not a dict")
    return result


def _download_torchvision(name: str, location: Path) -> None:
    import torchvision

    classes = {
        "cifar10": torchvision.datasets.CIFAR10,
        "cifar100": torchvision.datasets.CIFAR100,
        "fashion-mnist": torchvision.datasets.FashionMNIST,
    }
    _logger.info("downloading %s into %s with torchvision", name, location)
    try:
        for train in (True, False):
            classes[name](root=str(location), train=train, download=True)
    except (OSError, RuntimeError) as error:
        raise DataError(f"download of {name} into {location} failed: {error}") from error


# --- Fashion-MNIST IDX files ------------------------------------------------------

_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _fashion_mnist_sources(location: Path) -> tuple[_SplitSource, _SplitSource, list[str], str]:
    # torchvision's download puts the files in FashionMNIST/raw below the root.
    for folder in (location, location / "FashionMNIST" / "raw"):
        if _find_idx(folder, _FASHION_FILES["train_images"]) is not None:
            train, test = read_fashion_mnist(folder)
            return _array_source(*train), _array_source(*test), list(FASHION_MNIST_CLASSES), str(folder)
    raise DataError(
        f"Fashion-MNIST not found: looked for {_FASHION_FILES['train_images']}(.gz) in {location} and "
        f"{location / 'FashionMNIST' / 'raw'}; install it with 'apt-get install dataset-fashion-mnist' "
        f"(files land in {FASHION_MNIST_DIR}), pass --data-dir, or add --download"
    )


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / (stem + ".gz"), folder / stem):
        if candidate.is_file():
            return candidate
    return None


def read_fashion_mnist(folder: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Read Fashion-MNIST's four IDX files (gzipped or not) from ``folder``.

    Returns:
        ``(train_images, train_labels)`` and ``(test_images, test_labels)``,
        images as uint8 ``[N, 28, 28, 1]``.

    Raises:
        DataError: A file is missing or is not a valid IDX file.
    """
    arrays: dict[str, np.ndarray] = {}
    for key, stem in _FASHION_FILES.items():
        path = _find_idx(folder, stem)
        if path is None:
            raise DataError(f"Fashion-MNIST file {folder / stem}(.gz) is missing")
        arrays[key] = read_idx_file(path)
    result = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(
                f"Fashion-MNIST {split} files in {folder} disagree: images {images.shape}, labels {labels.shape}"
            )
        result.append((images[..., None].copy(), labels.astype(np.int64)))
    return result[0], result[1]


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx_file(path: Path) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzipped when its name ends in ``.gz``.

    Raises:
        DataError: The magic number, dimensions or length are invalid.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"cannot read {path}: {error}") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file: invalid magic number {raw[:4].hex()}")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: the header needs {header} bytes, the file has {len(raw)}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: dimensions {shape} need {expected} data bytes, the file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


# --- image folders (directory or archive) -----------------------------------------


def _image_folder_sources(location: Path) -> tuple[_SplitSource, _SplitSource, list[str], str]:
    if not location.exists():
        raise DataError(
            f"image folder {location} not found; pass --data-dir with a folder that has train/<class>/ and "
            "test/<class>/ images, or a .tar.gz archive of such a folder"
        )
    stat = location.stat()
    files = _read_image_folder_files(str(location.resolve()), stat.st_mtime_ns, stat.st_size)
    classes = sorted({cls for split in files.values() for cls in split})
    if set(files["train"]) != set(files["test"]):
        only_train = sorted(set(files["train"]) - set(files["test"]))
        only_test = sorted(set(files["test"]) - set(files["train"]))
        raise DataError(
            f"{location}: train/ and test/ have different classes (only in train: {only_train}, "
            f"only in test: {only_test}); give both splits the same class folders"
        )
    sources = []
    for split in ("train", "test"):
        blobs, labels, names = _interleave(files[split], classes)
        sources.append(_SplitSource(labels, _decoder(blobs, names)))
    return sources[0], sources[1], classes, str(location)


def read_image_folder(location: Path) -> tuple[ImageArrays, ImageArrays, list[str]]:
    """Decode every image of an image-folder layout (folder or ``.tar``/``.tar.gz`` archive).

    Images are interleaved round-robin over the sorted class folders, files
    sorted by name within a class.

    Returns:
        Train images, test images and the class names.

    Raises:
        DataError: The layout is missing, the splits disagree or an image cannot be decoded.
    """
    train_src, test_src, classes, _ = _image_folder_sources(Path(location))
    return (
        train_src.take(np.arange(len(train_src.labels))),
        test_src.take(np.arange(len(test_src.labels))),
        classes,
    )


def _interleave(
    by_class: dict[str, list[tuple[str, bytes]]], classes: list[str]
) -> tuple[list[bytes], np.ndarray, list[str]]:
    order: list[tuple[int, int, str, bytes]] = []
    for label, cls in enumerate(classes):
        for rank, (name, blob) in enumerate(sorted(by_class.get(cls, []))):
            order.append((rank, label, name, blob))
    order.sort(key=lambda item: (item[0], item[1]))
    blobs = [item[3] for item in order]
    labels = np.array([item[1] for item in order], dtype=np.int64)
    names = [item[2] for item in order]
    return blobs, labels, names


def _decoder(blobs: list[bytes], names: list[str]) -> Callable[[np.ndarray], np.ndarray]:
    def take(indices: np.ndarray) -> np.ndarray:
        selected = [int(i) for i in indices]
        if not selected:
            raise DataError("no images selected")
        with ThreadPoolExecutor(max_workers=_DECODE_THREADS) as pool:
            decoded = list(pool.map(lambda i: _decode_image(blobs[i], names[i]), selected))
        first_shape = decoded[0].shape
        for i, image in zip(selected, decoded):
            if image.shape != first_shape:
                raise DataError(
                    f"{names[i]} is {image.shape[1]}x{image.shape[0]} with {image.shape[2]} channels but "
                    f"{names[selected[0]]} is {first_shape[1]}x{first_shape[0]} with {first_shape[2]}; "
                    "resize the images to one size"
                )
        return np.stack(decoded)

    return take


def _decode_image(blob: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(blob)) as image:
            converted = image.convert("L" if image.mode in ("L", "1", "I;16", "I") else "RGB")
            array = np.asarray(converted, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"cannot decode image {name}: {error}") from error
    return array[..., None] if array.ndim == 2 else array


@lru_cache(maxsize=2)
def _read_image_folder_files(
    location: str, mtime_ns: int, size: int
) -> dict[str, dict[str, list[tuple[str, bytes]]]]:
    """Return split -> class -> [(name, encoded bytes)]; cached per path and modification time."""
    path = Path(location)
    if path.is_dir():
        files = _read_directory(path)
    elif tarfile.is_tarfile(path):
        files = _read_archive(path)
    else:
        raise DataError(
            f"{path} is neither a folder nor a tar archive; pass a folder with train/ and test/ or a .tar.gz of one"
        )
    for split in ("train", "test"):
        if not files.get(split):
            raise DataError(
                f"{path} has no {split}/<class>/<image> files; an image folder needs train/ and test/ "
                "folders with one subfolder per class"
            )
    return files


def _read_directory(root: Path) -> dict[str, dict[str, list[tuple[str, bytes]]]]:
    files: dict[str, dict[str, list[tuple[str, bytes]]]] = {"train": {}, "test": {}}
    for split in ("train", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            entries = [
                (str(f), f.read_bytes())
                for f in sorted(class_dir.iterdir())
                if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES
            ]
            if entries:
                files[split][class_dir.name] = entries
    return files


def _read_archive(path: Path) -> dict[str, dict[str, list[tuple[str, bytes]]]]:
    files: dict[str, dict[str, list[tuple[str, bytes]]]] = {"train": {}, "test": {}}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                parts = member.name.strip("/").split("/")
                if Path(parts[-1]).suffix.lower() not in _IMAGE_SUFFIXES or len(parts) < 3:
                    continue
                # Accept a leading folder above train/ and test/ (``cifar10/train/cat/1.jpg``).
                split, cls = parts[-3], parts[-2]
                if split not in files:
                    continue
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                files[split].setdefault(cls, []).append((f"{path}:{member.name}", handle.read()))
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(f"cannot read archive {path}: {error}") from error
    return files
