"""The one checkpoint loader that every command uses.

:func:`load_checkpoint` reads a torch zip file, a legacy torch pickle or a
safetensors file, detected by content, not by extension. It finds the state
dict inside wrapper containers and strips ``module.`` and ``_orig_mod.``
prefixes. The pruning reparametrization stays exactly as it is in the file.
It never runs code from a pickle unless the caller passes
``unsafe_load=True``.
"""

from __future__ import annotations

import argparse
import logging
import mmap
import os
import pickletools
import struct
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunedoctor.errors import CheckpointError, UnsafeCheckpointError

if TYPE_CHECKING:
    import torch

__all__ = [
    "Candidate",
    "Checkpoint",
    "STATE_DICT_KEYS",
    "EMA_KEYS",
    "KNOWN_PREFIXES",
    "PageReleaser",
    "detect_format",
    "find_unsafe_globals",
    "load_torch_file",
    "load_checkpoint",
    "strip_prefixes",
]

_logger = logging.getLogger(__name__)

# Keys under which training scripts store the weights, in the order of
# preference: the live model first, then its EMA copy.
STATE_DICT_KEYS = ("state_dict", "model", "net", "network", "module", "model_state_dict", "weights", "params")
EMA_KEYS = ("state_dict_ema", "model_ema", "ema", "ema_state_dict", "ema_model")
# Wrapper prefixes: DataParallel/DistributedDataParallel and torch.compile.
KNOWN_PREFIXES = ("module.", "_orig_mod.")
# Keys of saved training arguments.
ARGS_KEYS = ("args", "config", "cfg", "hparams", "hyper_parameters")

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80
_MAX_CONTAINER_DEPTH = 4


@dataclass(frozen=True)
class Candidate:
    """A mapping inside the file that looks like a state dict.

    Attributes:
        path: Key path from the top of the file, ``/``-separated; ``""`` is the top level.
        tensors: Number of tensor values.
        note: Why it ranks where it does (for the user).
    """

    path: str
    tensors: int
    note: str


@dataclass
class Checkpoint:
    """A loaded checkpoint and what the loader did to reach its state dict."""

    path: Path
    format: str
    size_bytes: int
    state_dict: dict[str, torch.Tensor]
    container: str = ""
    container_reason: str = "the file is a state dict"
    candidates: list[Candidate] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    args: dict[str, Any] | None = None
    unsafe_globals: list[str] = field(default_factory=list)
    loaded_unsafely: bool = False
    dropped_entries: list[str] = field(default_factory=list)


def detect_format(path: Path) -> str:
    """Return ``torch-zip``, ``torch-legacy`` or ``safetensors`` from the file's first bytes.

    Raises:
        CheckpointError: The file is missing, empty or of another kind.
    """
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: file is empty (0 bytes), not a checkpoint")
    with path.open("rb") as handle:
        head = handle.read(16)
    if head.startswith(_ZIP_MAGIC):
        return "torch-zip"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < header_len <= size - 8:
            return "safetensors"
    if head[0] == _PICKLE_PROTO:
        return "torch-legacy"
    shown = head[:8].hex(" ")
    raise CheckpointError(
        f"{path}: not a PyTorch or safetensors checkpoint (first bytes {shown}); "
        "expected a file written by torch.save or safetensors"
    )


def _safe_globals() -> list[Any]:
    """Data-only globals that real checkpoints carry beside their tensors."""
    import collections
    import pathlib

    allowed: list[Any] = [
        argparse.Namespace,
        collections.OrderedDict,
        pathlib.PosixPath,
        pathlib.WindowsPath,
        pathlib.PurePosixPath,
        pathlib.PureWindowsPath,
    ]
    try:
        import numpy as np

        allowed += [np.ndarray, np.dtype]
        allowed += [getattr(np, name) for name in ("bool_", "int8", "int16", "int32", "int64", "uint8",
                                                   "float16", "float32", "float64")]
        # Location of the pickled constructors moved from numpy.core to numpy._core in numpy 2.
        multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
        allowed += [(multiarray.scalar, f"{multiarray.__name__}.scalar"),
                    (multiarray._reconstruct, f"{multiarray.__name__}._reconstruct")]
        if multiarray.__name__.startswith("numpy._core"):
            allowed += [(multiarray.scalar, "numpy.core.multiarray.scalar"),
                        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]
        dtypes = getattr(np, "dtypes", None)
        if dtypes is not None:
            allowed += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    except ImportError:  # numpy is optional for torch; without it no numpy global can load anyway
        pass
    try:
        from torch.torch_version import TorchVersion

        allowed.append(TorchVersion)
    except ImportError:
        pass
    return allowed


@contextmanager
def _allowlisted() -> Iterator[None]:
    import torch.serialization

    with torch.serialization.safe_globals(_safe_globals()):
        yield


def _pickle_globals(stream: Any, pickles: int) -> set[str]:
    """Return ``module.name`` of every GLOBAL in the next ``pickles`` pickles, without running them."""
    found: set[str] = set()
    for _ in range(pickles):
        strings: list[str] = []
        for opcode, arg, _pos in pickletools.genops(stream):
            if opcode.name == "GLOBAL":
                found.add(str(arg).replace(" ", "."))
            elif opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(str(arg))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.add(f"{strings[-2]}.{strings[-1]}")
    return found


def find_unsafe_globals(path: Path, file_format: str) -> list[str]:
    """List the globals that a pickle-based checkpoint needs beyond the allowlist, without running it."""
    import torch.serialization
    from torch import _weights_only_unpickler

    if file_format == "safetensors":
        return []
    with _allowlisted():
        if file_format == "torch-zip":
            _check_torch_zip(path)
            try:
                return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
            except (ValueError, RuntimeError) as error:
                raise CheckpointError(
                    f"{path}: truncated or corrupt torch zip checkpoint ({_first_sentence(error)})"
                ) from None
        allowed = set(_weights_only_unpickler._get_allowed_globals()) | set(
            _weights_only_unpickler._get_user_allowed_globals()
        )
        found: set[str] = set()
        with path.open("rb") as stream:
            # A legacy file is four pickles (magic number, protocol, system
            # info, the object) followed by raw storage bytes. A plain pickle
            # has one; its globals are listed all the same, so that a
            # dangerous one is named before anything tries to load it.
            for position in range(4):
                try:
                    found |= _pickle_globals(stream, 1)
                except (ValueError, EOFError) as error:
                    if position == 0:
                        raise CheckpointError(f"{path}: corrupt pickle ({error})") from None
                    break
    return sorted(name for name in found if name not in allowed)


def _check_torch_zip(path: Path) -> None:
    """Reject a readable zip archive that has no ``data.pkl`` record, so it is no torch.save file."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return  # truncated or corrupt: torch's reader reports it with its own detail
    if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        shown = ", ".join(names[:3]) or "no files"
        raise CheckpointError(
            f"{path}: a zip archive without data.pkl ({shown}), so not a checkpoint written by torch.save"
        )


def load_torch_file(path: Path, *, weights_only: bool, mmap: bool) -> Any:
    """Call ``torch.load`` on a file written by ``torch.save``, whatever its name.

    torch 2.14 hands every path that ends in ``.safetensors`` to the
    safetensors reader, so a torch file with that name is opened here and
    passed as a file object instead. torch memory-maps only paths, so such a
    file is read into memory.
    """
    import torch

    if not str(path).endswith(".safetensors"):
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    with open(path, "rb") as handle:
        return torch.load(handle, map_location="cpu", weights_only=weights_only)


def _torch_load(path: Path, file_format: str, unsafe_load: bool) -> tuple[Any, list[str]]:
    import pickle

    unsafe_globals = find_unsafe_globals(path, file_format)
    if unsafe_globals and not unsafe_load:
        listed = ", ".join(unsafe_globals)
        raise UnsafeCheckpointError(
            f"{path}: not loaded: the pickle needs globals outside the safe allowlist ({listed}), "
            "and loading them can run code; if you trust the file, pass --unsafe-load",
            unsafe_globals,
        )
    mmap = file_format == "torch-zip"
    try:
        if unsafe_load:
            _logger.warning("loading %s with weights_only=False: code in the pickle can run", path)
            return load_torch_file(path, weights_only=False, mmap=mmap), unsafe_globals
        with _allowlisted():
            return load_torch_file(path, weights_only=True, mmap=mmap), unsafe_globals
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: weights_only=True loading failed ({_first_sentence(error)}); "
            "if you trust the file, pass --unsafe-load"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"{path}: truncated or corrupt {file_format} checkpoint ({_first_sentence(error)})"
        ) from None


def _first_sentence(error: BaseException) -> str:
    """Return the first line of an error's text, cut at its first sentence end."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    line = text.splitlines()[0]
    end = line.find(". ")
    return line[:end] if end > 0 else line.rstrip(".")


def _load_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({error})") from None
    return tensors, dict(metadata)


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _as_mapping(value: Any) -> Mapping[str, Any] | None:
    import torch

    if isinstance(value, torch.nn.Module):
        return value.state_dict()
    if isinstance(value, Mapping) and value and all(isinstance(key, str) for key in value):
        return value
    return None


def _tensor_count(mapping: Mapping[str, Any]) -> int:
    return sum(1 for value in mapping.values() if _is_tensor(value))


def _walk_candidates(obj: Any, path: str, depth: int) -> Iterator[tuple[str, Mapping[str, Any]]]:
    mapping = _as_mapping(obj)
    if mapping is None:
        return
    tensors = _tensor_count(mapping)
    if tensors and tensors * 2 > len(mapping):
        yield path, mapping
        return
    if depth >= _MAX_CONTAINER_DEPTH:
        return
    for key, value in mapping.items():
        yield from _walk_candidates(value, f"{path}/{key}" if path else key, depth + 1)


def _rank_candidate(path: str) -> tuple[int, str]:
    """Return (rank, note): live model keys first, then EMA copies, then anything else."""
    last = path.rsplit("/", 1)[-1]
    if path == "":
        return 0, "the file itself is a state dict"
    if last in STATE_DICT_KEYS:
        return 1 + STATE_DICT_KEYS.index(last), f"usual key for the model weights ({last!r})"
    if last in EMA_KEYS:
        return 100 + EMA_KEYS.index(last), f"EMA copy of the weights ({last!r})"
    return 200, "mapping of tensors under an unusual key"


def _select_state_dict(obj: Any, path: Path, select: str | None) -> tuple[str, str, Mapping[str, Any], list[Candidate]]:
    found = list(_walk_candidates(obj, "", 0))
    ranked = sorted(found, key=lambda item: (_rank_candidate(item[0])[0], -_tensor_count(item[1])))
    candidates = [Candidate(p, _tensor_count(m), _rank_candidate(p)[1]) for p, m in ranked]
    if select is not None:
        for candidate_path, mapping in ranked:
            if candidate_path == select.strip("/"):
                return candidate_path, "chosen with --select", mapping, candidates
        listed = ", ".join(repr(c.path) if c.path else "(top level)" for c in candidates) or "none"
        raise CheckpointError(f"{path}: --select {select!r} is not a state dict in the file; candidates: {listed}")
    if not ranked:
        top = _as_mapping(obj)
        keys = ", ".join(sorted(map(str, top))[:8]) if top is not None else type(obj).__name__
        raise CheckpointError(f"{path}: no state dict found (no mapping of names to tensors; top level: {keys})")
    chosen_path, mapping = ranked[0]
    rank, note = _rank_candidate(chosen_path)
    if len(ranked) > 1:
        others = ", ".join(repr(c.path) for c in candidates[1:])
        reason = f"{note}; other candidates: {others} (choose one with --select)"
    else:
        reason = note
    return chosen_path, reason, mapping, candidates


def strip_prefixes(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Strip ``module.`` and ``_orig_mod.`` prefixes that every key shares, nested in any order.

    Returns the renamed dict (same tensors, no copies) and the prefixes
    removed, outermost first.
    """
    current = dict(state_dict)
    stripped: list[str] = []
    while current:
        for prefix in KNOWN_PREFIXES:
            if all(key.startswith(prefix) for key in current):
                current = {key[len(prefix):]: value for key, value in current.items()}
                stripped.append(prefix)
                break
        else:
            break
    return current, stripped


def _summarize(value: Any, depth: int = 0) -> Any:
    """Return a JSON-able summary of a non-tensor value."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if _is_tensor(value):
        return f"tensor{list(value.shape)}"
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, Mapping) and depth < 2:
        return {str(k): _summarize(v, depth + 1) for k, v in list(value.items())[:64]}
    if isinstance(value, (list, tuple)) and depth < 2 and len(value) <= 16:
        return [_summarize(v, depth + 1) for v in value]
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return f"ndarray{list(value.shape)}"
    except ImportError:
        pass
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _find_args(top: Any) -> dict[str, Any] | None:
    mapping = top if isinstance(top, Mapping) else None
    if mapping is None:
        return None
    for key in ARGS_KEYS:
        value = mapping.get(key)
        if isinstance(value, argparse.Namespace):
            return dict(vars(value))
        if isinstance(value, Mapping) and not any(_is_tensor(v) for v in value.values()):
            return {str(k): v for k, v in value.items()}
    return None


def load_checkpoint(path: str | Path, *, select: str | None = None, unsafe_load: bool = False) -> Checkpoint:
    """Load a checkpoint and find its state dict.

    Args:
        path: A ``.pt``/``.pth``/``.bin``/``.ckpt`` file (torch zip or legacy
            pickle) or a ``.safetensors`` file, whatever its extension.
        select: Key path of the state dict inside the file (``/``-separated,
            for example ``model_ema`` or ``checkpoint/state_dict``); by
            default the loader picks the live model's weights.
        unsafe_load: Load pickles that need globals outside the allowlist with
            ``weights_only=False``. Code in the file can then run.

    Returns:
        The checkpoint. Its ``state_dict`` keeps ``*_orig``/``*_mask`` pairs as
        they are in the file, with wrapper prefixes stripped. Torch zip files
        are memory-mapped, so tensors are read from disk on first use.

    Raises:
        CheckpointError: The file is missing, corrupt, not a checkpoint, or has
            no state dict.
        UnsafeCheckpointError: The pickle needs globals outside the allowlist
            and ``unsafe_load`` is false.
    """
    path = Path(path)
    file_format = detect_format(path)
    size = path.stat().st_size
    metadata: dict[str, Any] = {}
    unsafe_globals: list[str] = []
    if file_format == "safetensors":
        top, header = _load_safetensors(path)
        metadata = {"safetensors": header} if header else {}
    else:
        top, unsafe_globals = _torch_load(path, file_format, unsafe_load)

    container, reason, mapping, candidates = _select_state_dict(top, path, select)
    tensors = {key: value for key, value in mapping.items() if _is_tensor(value)}
    dropped = sorted(key for key in mapping if key not in tensors)
    if dropped:
        _logger.warning("%s: ignored %d non-tensor entries in the state dict: %s", path, len(dropped),
                        ", ".join(dropped[:5]))
    state_dict, prefixes = strip_prefixes(tensors)

    if isinstance(top, Mapping) and container:
        root_key = container.split("/", 1)[0]
        for key, value in top.items():
            if str(key) != root_key and not (isinstance(value, Mapping) and _tensor_count(value)):
                metadata[str(key)] = _summarize(value)
        if len(metadata) > 0:
            _logger.debug("container entries: %s", ", ".join(metadata))

    return Checkpoint(
        path=path,
        format=file_format,
        size_bytes=size,
        state_dict=state_dict,
        container=container,
        container_reason=reason,
        candidates=candidates,
        prefixes=prefixes,
        metadata=metadata,
        args=_find_args(top),
        unsafe_globals=unsafe_globals,
        loaded_unsafely=unsafe_load and bool(unsafe_globals),
        dropped_entries=dropped,
    )


class PageReleaser:
    """Drops the resident pages of tensors that are memory-mapped from one file.

    ``torch.load(mmap=True)`` and ``safetensors.safe_open`` map the whole
    file privately. Every page that a computation reads stays in the
    process's resident set until the mapping is closed, so measuring every
    tensor of a 700 MB checkpoint would hold 700 MB. Releasing the pages of
    a tensor after its last use keeps the peak at about one tensor. A later
    read faults the pages back in from the file.

    Only pages inside a private mapping of this file are released, never
    anonymous memory. On systems without ``/proc/self/maps`` or
    ``MADV_DONTNEED``, :meth:`release` does nothing.

    NOTE: ``MADV_DONTNEED`` also drops pages that were written in place,
    which then read back as the file's bytes. Call :meth:`release` only on
    tensors that nothing has modified.
    """

    def __init__(self, path: str | Path) -> None:
        """Find the current private mappings of ``path`` (map the file before creating this)."""
        self._ranges = _private_mappings(Path(path))
        self._madvise = _load_madvise() if self._ranges else None

    def is_mapped(self, tensor: torch.Tensor) -> bool:
        """Return whether the data of ``tensor`` lies inside a private mapping of the file."""
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        return any(low <= start and end <= high for low, high in self._ranges)

    def release(self, tensors: Iterable[torch.Tensor]) -> None:
        """Release the whole pages that ``tensors`` occupy inside the file's mappings."""
        if self._madvise is None:
            return
        page = mmap.PAGESIZE
        for tensor in tensors:
            size = tensor.numel() * tensor.element_size()
            if size < page:
                continue
            address = tensor.data_ptr()
            start = (address + page - 1) // page * page
            end = (address + size) // page * page
            if end > start and any(low <= start and end <= high for low, high in self._ranges):
                self._madvise(start, end - start, mmap.MADV_DONTNEED)


def _private_mappings(path: Path) -> list[tuple[int, int]]:
    """Return the address ranges of the private mappings of ``path`` in this process."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return []
    try:
        info = path.stat()
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            lines = maps.readlines()
    except OSError:
        return []
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}"
    ranges: list[tuple[int, int]] = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[4] != str(info.st_ino) or fields[3] != device:
            continue
        if "p" not in fields[1]:
            continue
        low, high = (int(part, 16) for part in fields[0].split("-"))
        ranges.append((low, high))
    return ranges


def _load_madvise() -> Any:
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise
