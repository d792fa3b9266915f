"""Turn a pruned checkpoint into a plain state dict: the library part of ``prunedoctor normalize``.

Every ``X_orig``/``X_mask`` pair becomes ``X = X_orig * X_mask`` (what
``torch.nn.utils.prune.remove`` computes), masks are dropped or written to
a file of their own, and the wrapper container and ``module.``/``_orig_mod.``
prefixes are gone, so ``model.load_state_dict(state_dict, strict=True)``
accepts the output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prunedoctor.errors import OutputExistsError, PrunedoctorError, ReparametrizationError
from prunedoctor.inspection import ProgressCallback
from prunedoctor.io import PT_SUFFIXES, SAFETENSORS_SUFFIXES, OutputFormat, safetensors_dtype_name, save_state_dict
from prunedoctor.loading import Checkpoint, PageReleaser, load_checkpoint
from prunedoctor.reparam import (
    MASK_SUFFIX,
    ORIG_SUFFIX,
    ReparamIndex,
    has_mask_dtype,
    index_reparametrization,
    is_binary_mask,
    iter_effective_tensors,
)

if TYPE_CHECKING:
    import torch

__all__ = ["NormalizeResult", "default_output_path", "normalize_checkpoint"]

_logger = logging.getLogger(__name__)


@dataclass
class NormalizeResult:
    """Summary of what :func:`normalize_checkpoint` read, changed and wrote.

    Attributes:
        input: The checkpoint read (never modified).
        output: The plain state dict written.
        format: Format of ``output``.
        input_bytes: Size of ``input``.
        output_bytes: Size of ``output``.
        tensors: Tensors written to ``output``.
        merged: Parameter names whose ``_orig``/``_mask`` pair was merged.
        masks: Mask keys removed from the state dict (pairs' and sidecar masks).
        container: Key path of the state dict inside ``input`` ("" for the top level).
        prefixes: Key prefixes stripped, outermost first.
        masks_output: File the masks were written to, if requested.
        masks_bytes: Size of ``masks_output``.
        nonbinary_masks: Mask keys with entries other than 0 and 1 (merged as they are).
        nonfinite: Output keys whose tensors hold NaN or infinite values (written as they are).
        disagreeing_masks: Sidecar mask keys that are 0 where their plain weight
            is nonzero; the output keeps those unmasked values.
    """

    input: Path
    output: Path
    format: OutputFormat
    input_bytes: int
    output_bytes: int
    tensors: int
    merged: list[str] = field(default_factory=list)
    masks: list[str] = field(default_factory=list)
    container: str = ""
    prefixes: list[str] = field(default_factory=list)
    masks_output: Path | None = None
    masks_bytes: int | None = None
    nonbinary_masks: list[str] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)
    disagreeing_masks: list[str] = field(default_factory=list)


def default_output_path(input_path: str | Path, output_format: OutputFormat) -> Path:
    """Return ``<stem>.normalized.<ext>`` beside ``input_path``.

    The extension is the input's when it fits ``output_format`` (``.pth``
    stays ``.pth``), else ``.pt`` or ``.safetensors``.
    """
    path = Path(input_path)
    suffixes = SAFETENSORS_SUFFIXES if output_format == "safetensors" else PT_SUFFIXES
    suffix = path.suffix if path.suffix.lower() in suffixes else suffixes[0]
    stem = path.stem if path.suffix else path.name
    return path.with_name(f"{stem}.normalized{suffix}")


def normalize_checkpoint(
    path: str | Path,
    output: str | Path | None = None,
    *,
    format: OutputFormat | None = None,  # noqa: A002 - the public name of the option
    masks_output: str | Path | None = None,
    force: bool = False,
    select: str | None = None,
    unsafe_load: bool = False,
    progress: ProgressCallback | None = None,
) -> NormalizeResult:
    """Merge every pair of a checkpoint, drop its masks and write a plain state dict.

    The input is memory-mapped and merged one tensor at a time; the pages of
    each ``_orig``/``_mask`` pair are released once it is merged. The output
    goes through :func:`~prunedoctor.io.save_state_dict`, so it is written
    atomically and verified before it replaces anything.

    Keys: each ``X_orig`` becomes ``X`` at its position. ``X_mask`` keys
    and masks saved beside plain weights are dropped from the output, and
    written under their own keys to ``masks_output`` when it is given. Every
    other tensor is copied unchanged.

    Args:
        path: The checkpoint to read.
        output: Where to write; ``<stem>.normalized.<ext>`` beside ``path`` by default.
        format: ``pt`` or ``safetensors``; by default from ``output``'s
            extension, else the input's format.
        masks_output: Also write the masks to this file (format from its extension).
        force: Replace existing output files.
        select: Key path of the state dict inside the file (see ``load_checkpoint``).
        unsafe_load: Load a pickle that needs globals outside the allowlist.
        progress: Called as ``progress(done, total)`` after each tensor is merged.

    Raises:
        CheckpointError: The input cannot be read.
        ReparametrizationError: A pair cannot be merged (shape mismatch, a mask
            that is not float, bool or integer) or a mask or orig has no partner,
            so no correct plain state dict exists.
        OutputExistsError: An output exists and ``force`` is false.
        PrunedoctorError: An output would overwrite the input, or a dtype
            cannot be stored in the chosen format.
    """
    checkpoint = load_checkpoint(path, select=select, unsafe_load=unsafe_load)
    output_format, output_path = _resolve_output(checkpoint, output, format)
    masks_path = Path(masks_output) if masks_output is not None else None
    _check_destinations(checkpoint.path, output_path, masks_path, force)

    state_dict = checkpoint.state_dict
    index = index_reparametrization(state_dict.keys())
    _check_mergeable(checkpoint, index)
    if output_format == "safetensors":
        _check_safetensors_dtypes(state_dict, output_path)
    mask_keys = [mask_key for _, mask_key in index.pairs.values()] + list(index.sidecar_masks.values())

    releaser = PageReleaser(checkpoint.path)
    nonbinary = [key for key in index.sidecar_masks.values() if not is_binary_mask(state_dict[key])]
    disagreeing = _find_disagreeing_sidecars(state_dict, index)
    nonfinite: list[str] = []
    total = len(state_dict) - len(mask_keys)
    plain: dict[str, torch.Tensor] = {}
    for done, item in enumerate(iter_effective_tensors(state_dict, index, check_masks=True), start=1):
        plain[item.key] = item.tensor
        if _has_nonfinite(item.tensor):
            nonfinite.append(item.key)
        if len(item.source_keys) == 2:
            if item.mask_is_binary is False:
                nonbinary.append(item.source_keys[1])
            releaser.release(state_dict[source_key] for source_key in item.source_keys)
        if progress is not None:
            progress(done, total)
    for key in nonbinary:
        _logger.warning("%s has entries other than 0 and 1; merged as orig * mask, as prune.remove does", key)
    for key in nonfinite:
        _logger.warning("PD006: %s has NaN or infinite values; written as they are", key)
    for name, mask_key, count in disagreeing:
        _logger.warning(
            "PD009: %s is nonzero at %d entries where %s is 0; the output keeps these unmasked values "
            "(normalize never applies a mask saved beside a plain weight; multiply the weight by the mask "
            "first if it should apply)",
            name, count, mask_key,
        )
    output_bytes = save_state_dict(plain, output_path, format=output_format, force=force)
    tensors_written = len(plain)
    del plain

    masks_bytes = None
    if masks_path is not None:
        masks = {mask_key: state_dict[mask_key] for mask_key in mask_keys}
        masks_bytes = save_state_dict(masks, masks_path, force=force)
        releaser.release(masks.values())

    return NormalizeResult(
        input=checkpoint.path,
        output=output_path,
        format=output_format,
        input_bytes=checkpoint.size_bytes,
        output_bytes=output_bytes,
        tensors=tensors_written,
        merged=index.reparametrized,
        masks=mask_keys,
        container=checkpoint.container,
        prefixes=list(checkpoint.prefixes),
        masks_output=masks_path,
        masks_bytes=masks_bytes,
        nonbinary_masks=nonbinary,
        nonfinite=nonfinite,
        disagreeing_masks=[mask_key for _, mask_key, _ in disagreeing],
    )


def _has_nonfinite(tensor: torch.Tensor) -> bool:
    """Return whether a floating-point or complex tensor contains NaN or infinite values."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return False
    import torch

    return not bool(torch.isfinite(tensor).all())


def _find_disagreeing_sidecars(
    state_dict: dict[str, torch.Tensor], index: ReparamIndex
) -> list[tuple[str, str, int]]:
    """Return (weight key, mask key, entries) for each sidecar mask that is 0 where its weight is nonzero."""
    found = []
    for name, mask_key in index.sidecar_masks.items():
        weight, mask = state_dict.get(name), state_dict[mask_key]
        if weight is None or tuple(weight.shape) != tuple(mask.shape):
            continue
        count = int(((mask == 0) & (weight != 0)).sum())
        if count:
            found.append((name, mask_key, count))
    return found


def _resolve_output(
    checkpoint: Checkpoint, output: str | Path | None, file_format: OutputFormat | None
) -> tuple[OutputFormat, Path]:
    if output is not None:
        output_path = Path(output)
        if file_format is None:
            suffix = output_path.suffix.lower()
            if suffix in SAFETENSORS_SUFFIXES:
                file_format = "safetensors"
            elif suffix in PT_SUFFIXES:
                file_format = "pt"
            else:
                file_format = "safetensors" if checkpoint.format == "safetensors" else "pt"
        return file_format, output_path
    if file_format is None:
        file_format = "safetensors" if checkpoint.format == "safetensors" else "pt"
    return file_format, default_output_path(checkpoint.path, file_format)


def _check_destinations(input_path: Path, output: Path, masks: Path | None, force: bool) -> None:
    """Reject outputs that would replace the input or each other, and existing files without ``force``."""
    destinations = [output] if masks is None else [output, masks]
    for destination in destinations:
        if destination.exists() and _is_same_file(destination, input_path):
            raise PrunedoctorError(
                f"{destination}: is the input file; normalize never overwrites its input, choose another output"
            )
        if destination.exists() and not force:
            raise OutputExistsError(f"{destination}: file exists; pass --force to overwrite it")
    if masks is not None and masks.resolve() == output.resolve():
        raise PrunedoctorError(f"{masks}: the masks output is the same file as the output; choose another name")


def _is_same_file(first: Path, second: Path) -> bool:
    try:
        return first.samefile(second)
    except OSError:
        return first.resolve() == second.resolve()


def _check_mergeable(checkpoint: Checkpoint, index: ReparamIndex) -> None:
    """Raise one error listing every pair or orphan that has no correct merged value."""
    state_dict = checkpoint.state_dict
    problems: list[str] = []
    for key in index.orphan_origs:
        problems.append(f"{key} has no {key[: -len(ORIG_SUFFIX)]}{MASK_SUFFIX}, so its pruned value is unknown")
    for key in index.orphan_masks:
        problems.append(f"{key} has no {key[: -len(MASK_SUFFIX)]}{ORIG_SUFFIX}, so the weight itself is missing")
    for name, (orig_key, mask_key) in index.pairs.items():
        orig, mask = state_dict[orig_key], state_dict[mask_key]
        if tuple(orig.shape) != tuple(mask.shape):
            problems.append(f"{mask_key} has shape {tuple(mask.shape)} but {orig_key} has {tuple(orig.shape)}")
        elif not has_mask_dtype(mask):
            problems.append(f"{mask_key} has dtype {mask.dtype}, not float, bool or integer")
    if problems:
        shown = "; ".join(sorted(problems)[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ReparametrizationError(
            f"{checkpoint.path}: cannot normalize: {shown}{more}; run 'prunedoctor inspect' for every finding"
        )


def _check_safetensors_dtypes(state_dict: dict[str, torch.Tensor], output: Path) -> None:
    unsupported = sorted(key for key, tensor in state_dict.items() if safetensors_dtype_name(tensor.dtype) is None)
    if unsupported:
        dtypes = sorted({str(state_dict[key].dtype) for key in unsupported})
        raise PrunedoctorError(
            f"{output}: safetensors cannot store dtype {', '.join(dtypes)} (keys {', '.join(unsupported[:5])}); "
            "write a .pt file with --format pt"
        )
