"""The one reader of "the effective weight" of a pruned parameter.

``torch.nn.utils.prune`` replaces a parameter ``P`` by the parameter
``P_orig`` and the buffer ``P_mask``. The value that the module uses is
``P_orig * P_mask``, computed by a forward pre-hook and never saved, so a
state dict of a pruned model contains ``blocks.0.attn.qkv.weight_orig`` and
``blocks.0.attn.qkv.weight_mask`` but no ``blocks.0.attn.qkv.weight``.

Every other module calls :func:`effective_tensor` or
:func:`effective_state_dict` for weights, so no code path reads
``state_dict[name + '.weight']`` directly and no code path scores
``P_orig`` alone (which would bring pruned entries back).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple

from prunedoctor.errors import ReparametrizationError
from prunedoctor.findings import Finding

if TYPE_CHECKING:
    import torch

__all__ = [
    "ORIG_SUFFIX",
    "MASK_SUFFIX",
    "ReparamIndex",
    "index_reparametrization",
    "merge_pair",
    "effective_tensor",
    "effective_state_dict",
    "iter_effective_tensors",
    "EffectiveTensor",
    "masks_of",
    "is_binary_mask",
    "has_mask_dtype",
    "validate_reparametrization",
    "ParameterStats",
    "iter_parameter_stats",
    "measure_parameters",
]

ORIG_SUFFIX = "_orig"
MASK_SUFFIX = "_mask"


@dataclass
class ReparamIndex:
    """Locations of the reparametrized parameters, sidecar masks and orphans in a state dict.

    Attributes:
        pairs: Parameter name (``X.weight``) -> (``X.weight_orig``, ``X.weight_mask``).
        orphan_masks: ``*_mask`` keys with neither ``*_orig`` nor a plain tensor beside them.
        orphan_origs: ``*_orig`` keys without a ``*_mask``.
        sidecar_masks: Parameter name -> ``*_mask`` key, for masks saved beside a
            plain (already merged) tensor of the same name.
    """

    pairs: dict[str, tuple[str, str]] = field(default_factory=dict)
    orphan_masks: list[str] = field(default_factory=list)
    orphan_origs: list[str] = field(default_factory=list)
    sidecar_masks: dict[str, str] = field(default_factory=dict)

    @property
    def reparametrized(self) -> list[str]:
        """Names of the parameters stored as an orig/mask pair, in key order."""
        return list(self.pairs)

    def mask_key(self, name: str) -> str | None:
        """Return the key of the mask that applies to parameter ``name``, if any."""
        if name in self.pairs:
            return self.pairs[name][1]
        return self.sidecar_masks.get(name)


def index_reparametrization(keys: Iterable[str]) -> ReparamIndex:
    """Find orig/mask pairs, sidecar masks and orphans among state-dict keys."""
    key_list = list(keys)
    key_set = set(key_list)
    index = ReparamIndex()
    for key in key_list:
        if key.endswith(ORIG_SUFFIX):
            name = key[: -len(ORIG_SUFFIX)]
            mask_key = name + MASK_SUFFIX
            if mask_key in key_set:
                index.pairs[name] = (key, mask_key)
            else:
                index.orphan_origs.append(key)
        elif key.endswith(MASK_SUFFIX):
            name = key[: -len(MASK_SUFFIX)]
            if name + ORIG_SUFFIX in key_set:
                continue  # recorded with its orig
            if name in key_set:
                index.sidecar_masks[name] = key
            else:
                index.orphan_masks.append(key)
    return index


def is_binary_mask(mask: torch.Tensor) -> bool:
    """Return whether every entry is exactly 0 or 1, in any float, bool or integer dtype."""
    import torch

    if mask.dtype == torch.bool:
        return True
    if mask.is_complex():
        return False
    counter = _ChunkCounter()
    return all(counter.is_binary(chunk) for (chunk,) in _flat_chunks(mask))


def merge_pair(orig: torch.Tensor, mask: torch.Tensor, name: str = "<tensor>") -> torch.Tensor:
    """Return ``orig * mask`` in ``orig``'s dtype, as ``torch.nn.utils.prune.remove`` computes it.

    Raises:
        ReparametrizationError: The shapes differ.
    """
    return _merge(orig, mask, name, check_mask=False)[0]


def _merge(orig: torch.Tensor, mask: torch.Tensor, name: str, *, check_mask: bool) -> tuple[torch.Tensor, bool | None]:
    """Return ``orig * mask`` and, when ``check_mask``, whether the mask is binary (else None)."""
    if tuple(orig.shape) != tuple(mask.shape):
        raise ReparametrizationError(
            f"cannot merge {name}: {name}{ORIG_SUFFIX} has shape {tuple(orig.shape)} but "
            f"{name}{MASK_SUFFIX} has shape {tuple(mask.shape)}; the mask was saved for "
            "another layer or the file is corrupt"
        )
    import torch

    simple = orig.is_complex() or orig.requires_grad or mask.requires_grad
    if simple or not (orig.is_contiguous() and mask.is_contiguous()):
        return orig * mask.to(dtype=orig.dtype), is_binary_mask(mask) if check_mask else None
    # Chunk by chunk into one new tensor: the same elementwise product, but each
    # op stays in cache and on one thread (see _CHUNK_ELEMENTS). The mask check
    # reads each chunk while it is still in cache.
    merged = torch.empty(orig.shape, dtype=orig.dtype)
    counter = _ChunkCounter()
    binary = True if mask.dtype == torch.bool or not check_mask else not mask.is_complex()
    for merged_chunk, orig_chunk, mask_chunk in _flat_chunks(merged, orig, mask):
        torch.mul(orig_chunk, mask_chunk.to(dtype=orig.dtype), out=merged_chunk)
        if check_mask and binary and mask.dtype != torch.bool:
            binary = counter.is_binary(mask_chunk)
    return merged, binary if check_mask else None


def effective_tensor(
    state_dict: Mapping[str, torch.Tensor], name: str, index: ReparamIndex | None = None
) -> torch.Tensor:
    """Return the value that the module uses for parameter ``name``.

    That is ``name_orig * name_mask`` when the pair exists, else ``name``.

    Raises:
        ReparametrizationError: Neither ``name`` nor the pair exists, or the pair
            cannot be merged.
    """
    if index is None:
        index = index_reparametrization(state_dict.keys())
    if name in index.pairs:
        orig_key, mask_key = index.pairs[name]
        return merge_pair(state_dict[orig_key], state_dict[mask_key], name)
    if name in state_dict:
        return state_dict[name]
    near = sorted(k for k in state_dict if k.startswith(name))
    hint = f"; keys starting with it: {', '.join(near[:4])}" if near else ""
    raise ReparametrizationError(f"parameter {name!r} not found in the state dict{hint}")


class EffectiveTensor(NamedTuple):
    """One entry of a plain state dict, from :func:`iter_effective_tensors`.

    Attributes:
        key: Key in the plain state dict (``X`` for an ``X_orig``/``X_mask`` pair).
        tensor: The effective tensor (``X_orig * X_mask`` for a pair).
        source_keys: Keys read: the pair's ``X_orig`` and ``X_mask``, else ``key`` itself.
        mask_is_binary: For a pair, whether its mask holds only 0 and 1, when
            the caller requested the check; else None.
    """

    key: str
    tensor: torch.Tensor
    source_keys: tuple[str, ...]
    mask_is_binary: bool | None = None


def iter_effective_tensors(
    state_dict: Mapping[str, torch.Tensor], index: ReparamIndex | None = None, *, check_masks: bool = False
) -> Iterator[EffectiveTensor]:
    """Yield every entry of the plain state dict, in key order, merging one pair at a time.

    Keys: ``X_orig`` becomes ``X`` at the position of ``X_orig``, merged
    with ``X_mask``. Masks of pairs and sidecar masks are skipped. Orphan
    origs and orphan masks keep their keys, because they cannot be merged.
    Every other key and tensor is yielded as it is, without a copy. One
    merged tensor exists at a time unless the caller keeps them.

    Args:
        state_dict: The state dict as loaded.
        index: Its :func:`index_reparametrization`, computed when omitted.
        check_masks: Also report whether each pair's mask is binary, checked
            while the merge reads it.

    Raises:
        ReparametrizationError: A pair cannot be merged.
    """
    if index is None:
        index = index_reparametrization(state_dict.keys())
    orig_to_name = {orig_key: name for name, (orig_key, _) in index.pairs.items()}
    dropped = {mask_key for _, mask_key in index.pairs.values()}
    dropped.update(index.sidecar_masks.values())
    for key, tensor in state_dict.items():
        if key in dropped:
            continue
        name = orig_to_name.get(key)
        if name is None:
            yield EffectiveTensor(key, tensor, (key,))
        else:
            mask_key = index.pairs[name][1]
            merged, binary = _merge(tensor, state_dict[mask_key], name, check_mask=check_masks)
            yield EffectiveTensor(name, merged, (key, mask_key), binary)


def effective_state_dict(
    state_dict: Mapping[str, torch.Tensor], index: ReparamIndex | None = None
) -> dict[str, torch.Tensor]:
    """Return a plain state dict with every pair merged and every mask dropped.

    Keys: ``X_orig`` becomes ``X`` at the position of ``X_orig``. ``X_mask``
    of a pair and sidecar masks are dropped. Orphan origs and orphan masks
    keep their key, because they cannot be merged. Every other key and
    tensor is kept as it is, without a copy.

    Raises:
        ReparametrizationError: A pair cannot be merged.
    """
    return {item.key: item.tensor for item in iter_effective_tensors(state_dict, index)}


def masks_of(
    state_dict: Mapping[str, torch.Tensor], index: ReparamIndex | None = None
) -> dict[str, torch.Tensor]:
    """Return parameter name -> mask for pairs and sidecar masks."""
    if index is None:
        index = index_reparametrization(state_dict.keys())
    masks = {name: state_dict[mask_key] for name, (_, mask_key) in index.pairs.items()}
    for name, mask_key in index.sidecar_masks.items():
        masks[name] = state_dict[mask_key]
    return masks


def validate_reparametrization(
    state_dict: Mapping[str, torch.Tensor],
    index: ReparamIndex | None = None,
    stats: Mapping[str, ParameterStats] | None = None,
) -> list[Finding]:
    """Return the findings about pairs, orphans and masks, sorted by key.

    Codes: PD001 leftover pair, PD002 orphan mask, PD003 orphan orig, PD004
    shape mismatch, PD005 non-binary mask, PD009 a sidecar mask that the
    plain weight does not respect, PD011 a mask of a dtype that is not float,
    bool or integer.

    Args:
        state_dict: The state dict as loaded, pairs not merged.
        index: Its :func:`index_reparametrization`, computed when omitted.
        stats: Its :func:`measure_parameters`, computed when omitted. Passing
            the stats that a caller already measured avoids a second pass over
            every mask.
    """
    if index is None:
        index = index_reparametrization(state_dict.keys())
    if stats is None:
        stats = measure_parameters(state_dict, index)
    findings: list[Finding] = []
    for name, (orig_key, mask_key) in index.pairs.items():
        findings.append(
            Finding(
                "PD001",
                "error",
                name,
                f"{name} is stored as {orig_key} and {mask_key}; run 'prunedoctor normalize' "
                "to merge them into one tensor",
            )
        )
    for key in index.orphan_masks:
        findings.append(
            Finding("PD002", "error", key, f"{key} has no {key[: -len(MASK_SUFFIX)]}{ORIG_SUFFIX} beside it")
        )
    for key in index.orphan_origs:
        findings.append(
            Finding("PD003", "error", key, f"{key} has no {key[: -len(ORIG_SUFFIX)]}{MASK_SUFFIX} beside it")
        )
    for item in stats.values():
        findings.extend(_mask_findings(item, state_dict))
    return sorted(findings, key=lambda f: (f.key, f.code))


def _mask_findings(item: ParameterStats, state_dict: Mapping[str, torch.Tensor]) -> list[Finding]:
    """Return PD004, PD011, PD005 and PD009 for the mask of one measured parameter."""
    if item.mask_key is None:
        return []
    mask_key = item.mask_key
    mask = state_dict[mask_key]
    value_key = item.keys[0]
    findings: list[Finding] = []
    if item.kind != "orphan_mask" and tuple(mask.shape) != item.shape:
        findings.append(
            Finding(
                "PD004",
                "error",
                mask_key,
                f"{mask_key} has shape {tuple(mask.shape)} but {value_key} has shape {item.shape}",
            )
        )
    if not has_mask_dtype(mask):
        findings.append(
            Finding(
                "PD011",
                "error",
                mask_key,
                f"{mask_key} has dtype {_dtype_name(mask.dtype)}; a mask must be float, bool or integer",
            )
        )
    elif item.mask_nonbinary:
        findings.append(
            Finding(
                "PD005",
                "error",
                mask_key,
                f"{mask_key} has {item.mask_nonbinary} of {mask.numel()} entries that are neither 0 nor 1",
            )
        )
    if item.revived:
        findings.append(
            Finding(
                "PD009",
                "error",
                item.name,
                f"{item.name} is nonzero at {item.revived} entries where {mask_key} is 0: the mask was never "
                "applied, or training revived those entries",
            )
        )
    return findings


ParameterKind = Literal["pair", "plain", "orphan_orig", "orphan_mask"]

# Tensors are measured in flat chunks of this many entries. Chunks stay below
# torch's intra-op grain size (32768), so each op runs on one thread: with
# two OpenMP threads on a busy machine, thousands of small parallel ops
# wait at barriers for a descheduled thread. Chunks also keep temporaries
# in the CPU cache instead of allocating (and page-faulting) full-size ones.
_CHUNK_ELEMENTS = 1 << 15


@dataclass(frozen=True)
class ParameterStats:
    """Counts measured on one parameter's effective value and on its mask.

    Attributes:
        name: Parameter name (``X.weight`` for a ``X.weight_orig``/``X.weight_mask``
            pair) or, for orphans, the key itself.
        kind: ``pair``, ``plain`` (a tensor stored as itself, with or without a
            sidecar mask), ``orphan_orig`` or ``orphan_mask``.
        keys: State-dict keys that were read, value first, mask last.
        shape: Shape of the stored value (of the mask for an orphan mask).
        dtype: Dtype of the stored value without the ``torch.`` prefix.
        numel: Number of entries.
        zeros: Zero entries of the effective value (``orig * mask`` for a
            pair); None when a pair cannot be merged or for an orphan mask.
        nonfinite: NaN and infinite entries of the stored value.
        mask_key: Key of the mask that applies, if any.
        mask_zeros: Zero entries of the mask.
        mask_nonbinary: Mask entries other than exactly 0 and 1.
        revived: For a plain tensor with a sidecar mask, entries that are
            nonzero where the mask is 0.
        masked_zeros: Zero entries of ``value * mask`` for a plain tensor
            with a sidecar mask that can be applied (same shape, mask dtype),
            else None.
        row_nonzero: Boolean per row, True where the row of the masked value
            has a nonzero entry (NaN counts as nonzero). The masked value is
            ``orig * mask`` for a pair, ``value * mask`` for a sidecar mask,
            else the value. Set for floating-point matrices of at most
            ``_CHUNK_ELEMENTS`` columns whose mask, if any, can be applied,
            else None.
        col_nonzero: Boolean per column, as ``row_nonzero`` is per row.
    """

    name: str
    kind: ParameterKind
    keys: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    numel: int
    zeros: int | None
    nonfinite: int
    mask_key: str | None = None
    mask_zeros: int | None = None
    mask_nonbinary: int | None = None
    revived: int | None = None
    masked_zeros: int | None = None
    row_nonzero: torch.Tensor | None = field(default=None, compare=False, repr=False)
    col_nonzero: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def is_floating(self) -> bool:
        """Whether the value is a floating-point tensor (weights, not counters or indices)."""
        return self.dtype.startswith(("float", "bfloat"))

    @property
    def sparsity(self) -> float | None:
        """Fraction of zero entries of the effective value, or None when it is unknown or empty."""
        if self.zeros is None or self.numel == 0:
            return None
        return self.zeros / self.numel

    @property
    def mask_sparsity(self) -> float | None:
        """Fraction of zero entries of the mask, or None without a mask."""
        if self.mask_zeros is None or self.numel == 0:
            return None
        return self.mask_zeros / self.numel


def iter_parameter_stats(
    state_dict: Mapping[str, torch.Tensor], index: ReparamIndex | None = None
) -> Iterator[ParameterStats]:
    """Measure every parameter, one at a time, in key order.

    Each pair is measured as one parameter, from ``orig`` and ``mask``
    without materialising ``orig * mask`` beyond one chunk. Masks of pairs
    and sidecar masks are measured with the parameter they apply to; orphan
    masks are measured on their own. Yielding one parameter at a time lets a
    caller release the pages of a memory-mapped file as it goes.
    """
    if index is None:
        index = index_reparametrization(state_dict.keys())
    orig_to_name = {orig_key: name for name, (orig_key, _) in index.pairs.items()}
    paired_masks = {mask_key for _, mask_key in index.pairs.values()}
    paired_masks.update(index.sidecar_masks.values())
    orphan_masks = set(index.orphan_masks)
    orphan_origs = set(index.orphan_origs)
    counter = _ChunkCounter()
    for key, tensor in state_dict.items():
        if key in paired_masks:
            continue
        if key in orig_to_name:
            name = orig_to_name[key]
            mask_key = index.pairs[name][1]
            yield _measure_with_mask(counter, name, "pair", key, tensor, mask_key, state_dict[mask_key])
        elif key in orphan_masks:
            yield _measure_orphan_mask(counter, key, tensor)
        elif key in index.sidecar_masks:
            mask_key = index.sidecar_masks[key]
            yield _measure_with_mask(counter, key, "plain", key, tensor, mask_key, state_dict[mask_key])
        else:
            kind: ParameterKind = "orphan_orig" if key in orphan_origs else "plain"
            yield _measure_plain(counter, key, kind, tensor)


def measure_parameters(
    state_dict: Mapping[str, torch.Tensor], index: ReparamIndex | None = None
) -> dict[str, ParameterStats]:
    """Return parameter name -> :class:`ParameterStats` for every parameter, in key order."""
    return {item.name: item for item in iter_parameter_stats(state_dict, index)}


def _measure_plain(counter: _ChunkCounter, name: str, kind: ParameterKind, tensor: torch.Tensor) -> ParameterStats:
    lines = _NonzeroLines.for_tensor(tensor)
    nonzero = nonfinite = 0
    for start_row, (chunk,) in _aligned_chunks(lines, tensor):
        chunk_nonfinite = counter.count_nonfinite(chunk)
        nonfinite += chunk_nonfinite
        if lines is None:
            nonzero += counter.count_nonzero(chunk, nan_free=chunk_nonfinite == 0)
        else:
            lines.add(start_row, counter.indicate_nonzero(chunk, nan_free=chunk_nonfinite == 0))
    if lines is not None:
        nonzero = lines.count_nonzero()
    return ParameterStats(
        name=name,
        kind=kind,
        keys=(name,),
        shape=tuple(tensor.shape),
        dtype=_dtype_name(tensor.dtype),
        numel=tensor.numel(),
        zeros=tensor.numel() - nonzero,
        nonfinite=nonfinite,
        row_nonzero=lines.row_flags() if lines is not None else None,
        col_nonzero=lines.column_flags() if lines is not None else None,
    )


def _measure_orphan_mask(counter: _ChunkCounter, key: str, mask: torch.Tensor) -> ParameterStats:
    mask_nonzero, mask_nonbinary = _count_mask(mask, counter)
    return ParameterStats(
        name=key,
        kind="orphan_mask",
        keys=(key,),
        shape=tuple(mask.shape),
        dtype=_dtype_name(mask.dtype),
        numel=mask.numel(),
        zeros=None,
        nonfinite=0,
        mask_key=key,
        mask_zeros=mask.numel() - mask_nonzero,
        mask_nonbinary=mask_nonbinary,
    )


def _measure_with_mask(
    counter: _ChunkCounter,
    name: str,
    kind: ParameterKind,
    value_key: str,
    value: torch.Tensor,
    mask_key: str,
    mask: torch.Tensor,
) -> ParameterStats:
    """Measure a pair (``value`` is ``orig``) or a plain tensor with a sidecar mask."""
    import torch

    mask_nonzero = mask_nonbinary = value_nonzero = nonfinite = 0
    revived_count = masked_nonzero = 0
    mergeable = tuple(value.shape) == tuple(mask.shape) and has_mask_dtype(mask)
    lines = _NonzeroLines.for_tensor(value) if mergeable else None
    if mergeable:
        # One pass over aligned chunks, so each page of value and mask is read once.
        for start_row, (value_chunk, mask_chunk) in _aligned_chunks(lines, value, mask):
            chunk_nonzero, chunk_nonbinary = counter.count_mask(mask_chunk)
            chunk_nonfinite = counter.count_nonfinite(value_chunk)
            mask_nonzero += chunk_nonzero
            mask_nonbinary += chunk_nonbinary
            nonfinite += chunk_nonfinite
            nan_free = chunk_nonfinite == 0 and chunk_nonbinary == 0
            if kind == "plain":
                value_nonzero += counter.count_nonzero(value_chunk, nan_free=chunk_nonfinite == 0)
                revived_count += int(torch.logical_and(mask_chunk == 0, value_chunk != 0).sum())
            # The same product that prune.remove computes, one chunk at a time.
            if lines is None:
                masked_nonzero += counter.count_product_nonzero(value_chunk, mask_chunk, nan_free=nan_free)
            else:
                product = counter.multiply(value_chunk, mask_chunk)
                lines.add(start_row, counter.indicate_nonzero(product, nan_free=nan_free, scratch=True))
        if lines is not None:
            masked_nonzero = lines.count_nonzero()
        if kind == "pair":
            value_nonzero = masked_nonzero
    else:
        mask_nonzero, mask_nonbinary = _count_mask(mask, counter)
        for (chunk,) in _flat_chunks(value):
            chunk_nonfinite = counter.count_nonfinite(chunk)
            nonfinite += chunk_nonfinite
            value_nonzero += counter.count_nonzero(chunk, nan_free=chunk_nonfinite == 0)
    # An unmergeable pair has no effective value to count zeros in.
    zeros = value.numel() - value_nonzero if mergeable or kind == "plain" else None
    sidecar_applied = kind == "plain" and mergeable
    return ParameterStats(
        name=name,
        kind=kind,
        keys=(value_key, mask_key),
        shape=tuple(value.shape),
        dtype=_dtype_name(value.dtype),
        numel=value.numel(),
        zeros=zeros,
        nonfinite=nonfinite,
        mask_key=mask_key,
        mask_zeros=mask.numel() - mask_nonzero,
        mask_nonbinary=mask_nonbinary,
        revived=revived_count if sidecar_applied else None,
        masked_zeros=value.numel() - masked_nonzero if sidecar_applied else None,
        row_nonzero=lines.row_flags() if lines is not None else None,
        col_nonzero=lines.column_flags() if lines is not None else None,
    )


def _count_mask(mask: torch.Tensor, counter: _ChunkCounter | None = None) -> tuple[int, int]:
    """Return (nonzero entries, entries other than exactly 0 and 1) of a mask."""
    counter = counter or _ChunkCounter()
    nonzero = nonbinary = 0
    for (chunk,) in _flat_chunks(mask):
        chunk_nonzero, chunk_nonbinary = counter.count_mask(chunk)
        nonzero += chunk_nonzero
        nonbinary += chunk_nonbinary
    return nonzero, nonbinary


class _ChunkCounter:
    """Exact counts over chunks of at most ``_CHUNK_ELEMENTS`` entries, reusing one buffer per dtype."""

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, torch.Tensor] = {}
        # The last slice handed out per dtype: most chunks have the same size,
        # and slicing costs as much as a small op.
        self._slices: dict[torch.dtype, tuple[int, torch.Tensor]] = {}

    def _buffer(self, dtype: torch.dtype, size: int) -> torch.Tensor:
        import torch

        last = self._slices.get(dtype)
        if last is not None and last[0] == size:
            return last[1]
        buffer = self._buffers.get(dtype)
        if buffer is None:
            buffer = self._buffers[dtype] = torch.empty(_CHUNK_ELEMENTS, dtype=dtype)
        view = buffer[:size]
        self._slices[dtype] = (size, view)
        return view

    def count_nonzero(self, chunk: torch.Tensor, *, nan_free: bool, scratch: bool = False) -> int:
        """Return the entries that are not 0; NaN counts as nonzero.

        A float chunk that the caller knows to contain no NaN is counted as
        ``sum(sign(abs(x)))`` in float32. The sum is exact because a chunk has
        fewer than 2**24 entries. torch.count_nonzero is several times slower
        on masks whose zeros are spread at random, because it branches per
        entry. ``torch.sign`` maps NaN to 0, hence the ``nan_free`` contract.
        ``scratch`` marks ``chunk`` as this counter's buffer and may be
        overwritten.
        """
        import torch

        if not nan_free or not chunk.is_floating_point():
            return int(torch.count_nonzero(chunk))
        indicator = self.indicate_nonzero(chunk, nan_free=True, scratch=scratch)
        return int(indicator.sum(dtype=torch.float32))

    def count_mask(self, chunk: torch.Tensor) -> tuple[int, int]:
        """Return (nonzero entries, entries other than exactly 0 and 1) of a mask chunk."""
        import torch

        if chunk.dtype == torch.bool:
            return int(chunk.sum()), 0
        if self.is_binary(chunk):
            # Exact: a chunk of 0s and 1s sums to at most 2**15 in float32.
            total = chunk.sum(dtype=torch.float32) if chunk.is_floating_point() else chunk.sum()
            return int(total), 0
        nonzero = int(torch.count_nonzero(chunk))
        # NaN is nonzero and not 1, so it counts as non-binary.
        return nonzero, nonzero - int(torch.count_nonzero(chunk == 1))

    def is_binary(self, chunk: torch.Tensor) -> bool:
        """Return whether every entry of a float or integer chunk is exactly 0 or 1.

        ``m - m * m`` is exactly zero only for 0 and 1 (and -0.0), whether
        addcmul rounds the product or fuses it. For any other finite float,
        the square differs from ``m`` by more than half an ulp. Integers wrap
        without reaching zero, and NaN or infinity propagate through the min
        and max.
        """
        import torch

        if chunk.is_complex():
            return False
        work = self._buffer(chunk.dtype, chunk.numel())
        torch.addcmul(chunk, chunk, chunk, value=-1, out=work)
        low, high = torch.aminmax(work)
        return low.item() == 0 and high.item() == 0

    @staticmethod
    def count_nonfinite(chunk: torch.Tensor) -> int:
        """Return the NaN and infinite entries; integer and bool chunks have none."""
        import torch

        if chunk.is_complex():
            return chunk.numel() - int(torch.count_nonzero(torch.isfinite(chunk)))
        if not chunk.is_floating_point():
            return 0
        # A sum propagates NaN and infinity, so a finite sum proves the chunk
        # finite without the temporaries of isfinite. A sum that overflows
        # only sends the chunk to the exact count below.
        total = chunk.sum(dtype=torch.float64 if chunk.dtype == torch.float64 else torch.float32)
        if math.isfinite(total.item()):
            return 0
        return chunk.numel() - int(torch.count_nonzero(torch.isfinite(chunk)))

    def count_product_nonzero(self, orig: torch.Tensor, mask: torch.Tensor, *, nan_free: bool) -> int:
        """Return the nonzero entries of ``orig * mask`` in ``orig``'s dtype, as merge_pair computes it.

        ``nan_free`` means that ``orig`` is finite and ``mask`` binary, so the
        product contains no NaN.
        """
        import torch

        if orig.is_complex():
            return int(torch.count_nonzero(orig * mask.to(dtype=orig.dtype)))
        return self.count_nonzero(self.multiply(orig, mask), nan_free=nan_free, scratch=True)

    def multiply(self, orig: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Return ``orig * mask`` in ``orig``'s real dtype, in this counter's buffer (valid until its next use)."""
        import torch

        if mask.dtype != orig.dtype:
            mask = mask.to(dtype=orig.dtype)
        product = self._buffer(orig.dtype, orig.numel())
        torch.mul(orig, mask, out=product)
        return product

    def indicate_nonzero(self, chunk: torch.Tensor, *, nan_free: bool, scratch: bool = False) -> torch.Tensor:
        """Return 1 where a floating-point chunk is nonzero (NaN included) and 0 elsewhere, in its dtype.

        The result is this counter's buffer, valid until its next use. With
        ``nan_free`` it is ``sign(abs(x))``, the cheap form that
        :meth:`count_nonzero` explains. Pass ``scratch`` when ``chunk`` is
        this counter's buffer, which is then overwritten.
        """
        import torch

        work = chunk if scratch else self._buffer(chunk.dtype, chunk.numel())
        if nan_free:
            torch.abs(chunk, out=work)
            torch.sign(work, out=work)
        else:
            work.copy_(chunk != 0)
        return work


class _NonzeroLines:
    """Row counts and column flags of nonzero entries of one matrix, accumulated over row-aligned chunks.

    The chunks come from :func:`_aligned_chunks` and hold whole rows,
    ``rows_per_chunk`` at a time, as 0/1 indicators. Each chunk costs two
    reductions that stay in cache: a sum per row, and an elementwise maximum
    into a ``[rows_per_chunk, cols]`` accumulator that is reduced over its
    rows once at the end.
    """

    def __init__(self, rows: int, cols: int, dtype: torch.dtype) -> None:
        import torch

        self.cols = cols
        self.rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(cols, 1))
        # Exact: a row count is at most _CHUNK_ELEMENTS, far below 2**24.
        self._row_counts = torch.zeros(rows, dtype=torch.float32)
        self._column_hits = torch.zeros(min(rows, self.rows_per_chunk), cols, dtype=dtype)
        self._full_rows = self._column_hits.shape[0]

    @classmethod
    def for_tensor(cls, tensor: torch.Tensor) -> _NonzeroLines | None:
        """Return an accumulator for a floating-point matrix whose rows fit in one chunk, else None."""
        if tensor.dim() != 2 or not tensor.is_floating_point() or tensor.shape[1] > _CHUNK_ELEMENTS:
            return None
        rows, cols = tensor.shape
        return cls(rows, cols, tensor.dtype)

    def add(self, start_row: int, indicator: torch.Tensor) -> None:
        """Add a flat 0/1 chunk of whole rows that starts at row ``start_row``."""
        import torch

        block = indicator.view(-1, self.cols)
        count = block.shape[0]
        torch.sum(block, dim=1, dtype=torch.float32, out=self._row_counts[start_row : start_row + count])
        hits = self._column_hits if count == self._full_rows else self._column_hits[:count]
        torch.maximum(hits, block, out=hits)

    def count_nonzero(self) -> int:
        """Return the nonzero entries of the whole matrix."""
        import torch

        return int(self._row_counts.sum(dtype=torch.float64))

    def row_flags(self) -> torch.Tensor:
        """Return, per row, whether it has a nonzero entry."""
        return self._row_counts > 0

    def column_flags(self) -> torch.Tensor:
        """Return, per column, whether it has a nonzero entry."""
        import torch

        if self._column_hits.shape[0] == 0:
            return torch.zeros(self.cols, dtype=torch.bool)
        return self._column_hits.amax(dim=0) > 0


def _aligned_chunks(
    lines: _NonzeroLines | None, *tensors: torch.Tensor
) -> Iterator[tuple[int, tuple[torch.Tensor, ...]]]:
    """Yield (first row, aligned flat chunks): whole rows for ``lines``, else flat chunks with first row 0."""
    if lines is None:
        for chunks in _flat_chunks(*tensors):
            yield 0, chunks
        return
    size = lines.rows_per_chunk * lines.cols
    for number, chunks in enumerate(_flat_chunks(*tensors, size=size)):
        yield number * lines.rows_per_chunk, chunks


def _flat_chunks(*tensors: torch.Tensor, size: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield aligned flat slices of equally sized tensors, ``size`` entries each (the last may be shorter).

    ``size`` defaults to ``_CHUNK_ELEMENTS``, read at each call.
    """
    if tensors[0].numel() == 0:
        return  # split would yield one empty chunk, and aminmax rejects empty input
    chunk_size = _CHUNK_ELEMENTS if size is None else size
    yield from zip(*(tensor.reshape(-1).split(chunk_size) for tensor in tensors))


def has_mask_dtype(mask: torch.Tensor) -> bool:
    """Return whether ``mask`` has a dtype that a mask may have: float, bool or integer, not complex."""
    import torch

    return not mask.is_complex() and (mask.is_floating_point() or mask.dtype == torch.bool or _is_integer(mask))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_integer(tensor: torch.Tensor) -> bool:
    import torch

    return tensor.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
