"""The one atomic writer of state dicts, for ``.pt`` and ``.safetensors`` files.

Every command that writes tensors calls :func:`save_state_dict`. It writes to
a temporary file in the destination's directory, re-reads that file and
compares every tensor bit for bit, and only then moves it into place with
``os.replace``. An existing file is never overwritten unless ``force`` is
true, and a failure at any step leaves the destination as it was.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal

from prunedoctor.errors import OutputExistsError, PrunedoctorError

if TYPE_CHECKING:
    import torch

    from prunedoctor.loading import PageReleaser

__all__ = [
    "OutputFormat",
    "PT_SUFFIXES",
    "SAFETENSORS_SUFFIXES",
    "format_from_path",
    "save_state_dict",
    "safetensors_dtype_name",
    "write_bytes_atomic",
]

_logger = logging.getLogger(__name__)

OutputFormat = Literal["pt", "safetensors"]

PT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)

# Data in a safetensors file starts after an 8-byte header length and the
# JSON header. Padding the header to a multiple of 8 bytes keeps every
# tensor aligned to its element size.
_SAFETENSORS_ALIGNMENT = 8


def format_from_path(path: str | Path) -> OutputFormat:
    """Return the output format that the file extension of ``path`` implies.

    Raises:
        PrunedoctorError: The extension is neither a torch nor a safetensors one.
    """
    suffix = Path(path).suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in PT_SUFFIXES:
        return "pt"
    raise PrunedoctorError(
        f"{path}: unknown output extension {suffix or '(none)'!r}; "
        f"use one of {', '.join(PT_SUFFIXES + SAFETENSORS_SUFFIXES)} or pass the format explicitly"
    )


def safetensors_dtype_name(dtype: torch.dtype) -> str | None:
    """Return the safetensors name of a torch dtype (``F32``, ``BF16``, ...), or None if it has none."""
    return _safetensors_dtype_names().get(dtype)


def _safetensors_dtype_names() -> dict[torch.dtype, str]:
    import torch

    names = {
        torch.float64: "F64",
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
        torch.complex64: "C64",
    }
    optional = {
        "float8_e4m3fn": "F8_E4M3",
        "float8_e5m2": "F8_E5M2",
        "uint16": "U16",
        "uint32": "U32",
        "uint64": "U64",
    }
    for attribute, name in optional.items():
        dtype = getattr(torch, attribute, None)
        if dtype is not None:
            names[dtype] = name
    return names


def save_state_dict(
    tensors: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    format: OutputFormat | None = None,  # noqa: A002 - the public name of the option
    force: bool = False,
    metadata: dict[str, str] | None = None,
    verify: bool = True,
) -> int:
    """Write a flat mapping of names to tensors atomically and return the bytes written.

    The file is first written to a temporary file in the same directory,
    flushed to disk, optionally re-read and compared bit for bit with
    ``tensors``, and then renamed onto ``path``. Tensors are detached and
    written in the mapping's order.

    ``pt`` files are written with ``torch.save`` as a plain dict, so
    ``torch.load(weights_only=True)`` reads them. Tensors that share storage
    stay shared, and a tensor that views only part of its storage is copied
    first so that the file does not carry the rest of that storage.
    ``safetensors`` files are written one tensor at a time, so shared and
    non-contiguous tensors are accepted. Beyond the inputs, memory grows by
    at most one contiguous copy of one tensor.

    Args:
        tensors: Names to tensors. CPU and other devices are accepted; values
            are written from CPU memory.
        path: Destination file. Its directory must exist.
        format: ``"pt"`` or ``"safetensors"``; by default taken from the
            extension of ``path`` (``.pt``, ``.pth``, ``.bin``, ``.ckpt`` or
            ``.safetensors``).
        force: Replace ``path`` if it exists.
        metadata: String pairs stored in the safetensors header
            (``__metadata__``). Torch files have no place for them, so
            passing metadata with the ``pt`` format raises ``ValueError``.
        verify: Re-read the written file and compare every tensor's name,
            dtype, shape and bytes before moving it into place.

    Returns:
        The size of the written file in bytes.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is false.
        PrunedoctorError: The extension does not imply a format, the
            directory is missing, writing failed, a dtype has no safetensors
            equivalent, or the re-read file differs from ``tensors``.
        TypeError: A key is not a string or a value is not a tensor.
        ValueError: ``metadata`` was given for the ``pt`` format or contains a
            value that is not a string.
    """
    path = Path(path)
    file_format = format if format is not None else format_from_path(path)
    if file_format not in ("pt", "safetensors"):
        raise ValueError(f"format must be 'pt' or 'safetensors', got {file_format!r}")
    _check_tensors(tensors)
    _check_metadata(metadata, file_format)
    _check_destination(path, force)

    # The temporary file gets the destination's name inside a private directory
    # beside it. torch.save names a zip archive's root folder after the file,
    # so the bytes match a direct torch.save to ``path``. A path, unlike a file
    # object, also lets torch write the records natively, about twice as fast.
    try:
        temp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as error:
        raise PrunedoctorError(f"{path}: cannot write the file ({error.strerror or error})") from None
    temp_path = temp_dir / path.name
    try:
        if file_format == "pt":
            _write_pt(tensors, temp_path)
        else:
            with temp_path.open("wb") as handle:
                _write_safetensors(tensors, handle, metadata)
        sync = _FileSync(temp_path)
        try:
            if verify:
                _verify_file(temp_path, file_format, tensors, path)
        finally:
            sync.wait()
        os.chmod(temp_path, 0o666 & ~_current_umask())
        if path.exists() and not force:
            # Another process created the destination while this one wrote.
            raise OutputExistsError(f"{path}: file exists; pass --force to overwrite it")
        os.replace(temp_path, path)
    except OSError as error:
        raise PrunedoctorError(f"{path}: cannot write the file ({error.strerror or error})") from None
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    _sync_directory(path.parent)
    size = path.stat().st_size
    _logger.debug("wrote %d tensors to %s (%d bytes, %s)", len(tensors), path, size, file_format)
    return size


def _check_tensors(tensors: Mapping[str, torch.Tensor]) -> None:
    import torch

    for key, value in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"state-dict keys must be strings, got {key!r} of type {type(key).__name__}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{key}: expected a torch.Tensor, got {type(value).__name__}")


def _check_metadata(metadata: dict[str, str] | None, file_format: OutputFormat) -> None:
    if metadata is None:
        return
    if file_format == "pt":
        raise ValueError("metadata can only be stored in safetensors files; pass format='safetensors' or no metadata")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata must map strings to strings, got {key!r}: {value!r}")


def _check_destination(path: Path, force: bool) -> None:
    if path.is_dir():
        raise PrunedoctorError(f"{path}: is a directory; give a file name for the output")
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: file exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise PrunedoctorError(f"{path}: directory {path.parent} does not exist; create it first")


class _FileSync:
    """``os.fsync`` of a file on a thread, so that verification reads the file while the disk writes it.

    fsync releases the GIL and mostly waits for the device, so the two overlap
    instead of adding up. The thread opens its own descriptor; fsync flushes
    the file's data whichever descriptor it is called on.
    """

    def __init__(self, path: Path) -> None:
        import threading

        self._descriptor = os.open(path, os.O_RDONLY)
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="prunedoctor-fsync", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            os.fsync(self._descriptor)
        except OSError as error:
            self._error = error
        finally:
            os.close(self._descriptor)

    def wait(self) -> None:
        """Block until the data is on disk.

        Raises:
            OSError: fsync failed.
        """
        self._thread.join()
        if self._error is not None:
            raise self._error


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it and move it into place with ``os.replace``.

    Unlike :func:`save_state_dict`, this overwrites an existing file: it is
    for files that a run rewrites (logs, histories, resume checkpoints).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp creates the file readable by its owner only; give it the
        # permissions that open() would have given it.
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    # os.umask can only be read by setting it; the value is restored at once.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sync_directory(directory: Path) -> None:
    """Flush the rename to disk where the platform allows opening a directory."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _plain_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Return a detached CPU tensor that does not view a larger storage."""
    import torch

    plain = tensor.detach().cpu()
    if plain.untyped_storage().nbytes() != plain.numel() * plain.element_size():
        return plain.clone(memory_format=torch.contiguous_format)
    return plain


def _write_pt(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    import torch

    # Tensors that share one whole storage (tied weights) keep sharing it.
    plain = {key: _plain_tensor(value) for key, value in tensors.items()}
    torch.save(plain, str(path))


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Return the little-endian bytes of ``tensor`` in row-major order, without a copy where possible."""
    import torch

    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _write_safetensors(
    tensors: Mapping[str, torch.Tensor], handle: IO[bytes], metadata: dict[str, str] | None
) -> None:
    if sys.byteorder != "little":
        # NOTE: safetensors stores little-endian data; byte swapping is not implemented.
        raise PrunedoctorError("writing safetensors files is supported on little-endian machines only")
    names = _safetensors_dtype_names()
    # Larger elements first, so that every tensor starts at a multiple of its element size.
    order = sorted(tensors, key=lambda key: (-tensors[key].element_size(), key))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for key in order:
        tensor = tensors[key]
        dtype_name = names.get(tensor.dtype)
        if dtype_name is None:
            raise PrunedoctorError(
                f"{key}: dtype {tensor.dtype} has no safetensors equivalent; write a .pt file instead"
            )
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": dtype_name, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % _SAFETENSORS_ALIGNMENT)
    handle.write(struct.pack("<Q", len(encoded)))
    handle.write(encoded)
    for key in order:
        tensor = tensors[key]
        if tensor.numel():
            handle.write(_tensor_bytes(tensor))


def _verify_file(temp_path: Path, file_format: OutputFormat, expected: Mapping[str, torch.Tensor], path: Path) -> None:
    """Re-read ``temp_path`` and compare every tensor with ``expected``, bit for bit.

    The file is memory-mapped and the pages of each tensor are released after
    its comparison, so verifying keeps about one tensor in memory.
    """
    from prunedoctor.loading import PageReleaser, load_torch_file

    if file_format == "pt":
        written = load_torch_file(temp_path, weights_only=True, mmap=True)
        if not isinstance(written, dict):
            raise PrunedoctorError(f"{path}: verification failed: the written file is not a dict")
        _compare_tensors(list(written), written.__getitem__, expected, path, PageReleaser(temp_path))
        return

    from safetensors import safe_open

    with safe_open(str(temp_path), framework="pt", device="cpu") as handle:
        _compare_tensors(list(handle.keys()), handle.get_tensor, expected, path, PageReleaser(temp_path))


def _compare_tensors(
    keys: list[str],
    read: Callable[[str], torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    path: Path,
    releaser: PageReleaser,
) -> None:
    missing = sorted(set(expected) - set(keys))
    unexpected = sorted(set(keys) - set(expected))
    if missing or unexpected:
        raise PrunedoctorError(
            f"{path}: verification failed: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    for key, tensor in expected.items():
        actual = read(key)
        source = tensor.detach().cpu()
        if actual.dtype != source.dtype or tuple(actual.shape) != tuple(source.shape):
            raise PrunedoctorError(
                f"{path}: verification failed for {key}: wrote {actual.dtype} {tuple(actual.shape)}, "
                f"expected {source.dtype} {tuple(source.shape)}"
            )
        if source.numel() and not _equal_bytes(actual, source):
            raise PrunedoctorError(f"{path}: verification failed for {key}: the bytes read back differ")
        releaser.release([actual])


# Compared in pieces of this many elements: below torch's intra-op grain size,
# so each torch.equal runs on one thread and a busy machine cannot stall it
# at a barrier (see _CHUNK_ELEMENTS in prunedoctor.reparam).
_COMPARE_ELEMENTS = 1 << 15


def _equal_bytes(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Return whether two tensors of one dtype and shape hold the same bytes (NaN and -0.0 included)."""
    import torch

    left = first.contiguous().reshape(-1).view(torch.uint8)
    right = second.contiguous().reshape(-1).view(torch.uint8)
    if left.numel() % 8 == 0 and left.data_ptr() % 8 == 0 and right.data_ptr() % 8 == 0:
        left, right = left.view(torch.int64), right.view(torch.int64)
    return all(
        torch.equal(left_piece, right_piece)
        for left_piece, right_piece in zip(left.split(_COMPARE_ELEMENTS), right.split(_COMPARE_ELEMENTS))
    )
