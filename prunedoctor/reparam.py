"""The one reader of "the effective weight" of a pruned parameter.

``torch.nn.utils.prune`` replaces a parameter ``P`` by the parameter
``P_orig`` and the buffer ``P_mask``. The value that the module uses is
``P_orig * P_mask``, computed by a forward pre-hook and never saved, so a
state dict of a pruned model holds ``blocks.0.attn.qkv.weight_orig`` and
``blocks.0.attn.qkv.weight_mask`` but no ``blocks.0.attn.qkv.weight``.

Every other module asks :func:`effective_tensor` or
:func:`effective_state_dict` for weights, so no code path reads
``state_dict[name + '.weight']`` directly and no code path scores
``P_orig`` alone (which would bring pruned entries back).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
    "masks_of",
    "is_binary_mask",
    "validate_reparametrization",
]

ORIG_SUFFIX = "_orig"
MASK_SUFFIX = "_mask"


@dataclass
class ReparamIndex:
    """Where the reparametrized parameters of a state dict are.

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
    return bool(torch.logical_or(mask == 0, mask == 1).all())


def merge_pair(orig: torch.Tensor, mask: torch.Tensor, name: str = "<tensor>") -> torch.Tensor:
    """Return ``orig * mask`` in ``orig``'s dtype, as ``torch.nn.utils.prune.remove`` computes it.

    Raises:
        ReparametrizationError: The shapes differ.
    """
    if tuple(orig.shape) != tuple(mask.shape):
        raise ReparametrizationError(
            f"cannot merge {name}: {name}{ORIG_SUFFIX} has shape {tuple(orig.shape)} but "
            f"{name}{MASK_SUFFIX} has shape {tuple(mask.shape)}; the mask was saved for "
            "another layer or the file is corrupt"
        )
    return orig * mask.to(dtype=orig.dtype)


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


def effective_state_dict(
    state_dict: Mapping[str, torch.Tensor], index: ReparamIndex | None = None
) -> dict[str, torch.Tensor]:
    """Return a plain state dict with every pair merged and every mask dropped.

    Keys: ``X_orig`` becomes ``X`` at the position of ``X_orig``; ``X_mask`` of
    a pair and sidecar masks are dropped; orphan origs keep their key (they
    cannot be merged); every other key and tensor is kept as it is, without
    a copy.

    Raises:
        ReparametrizationError: A pair cannot be merged.
    """
    if index is None:
        index = index_reparametrization(state_dict.keys())
    orig_to_name = {orig_key: name for name, (orig_key, _) in index.pairs.items()}
    dropped = {mask_key for _, mask_key in index.pairs.values()}
    dropped.update(index.sidecar_masks.values())
    merged: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key in dropped:
            continue
        name = orig_to_name.get(key)
        if name is None:
            merged[key] = tensor
        else:
            merged[name] = merge_pair(tensor, state_dict[index.pairs[name][1]], name)
    return merged


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
    state_dict: Mapping[str, torch.Tensor], index: ReparamIndex | None = None
) -> list[Finding]:
    """Return the findings about pairs, orphans and masks, sorted by key.

    Codes: PD001 leftover pair, PD002 orphan mask, PD003 orphan orig, PD004
    shape mismatch, PD005 non-binary mask, PD009 a sidecar mask that the
    plain weight does not respect, PD011 a mask of a dtype that is not float,
    bool or integer.
    """
    import torch

    if index is None:
        index = index_reparametrization(state_dict.keys())
    findings: list[Finding] = []
    for name, (orig_key, mask_key) in index.pairs.items():
        orig, mask = state_dict[orig_key], state_dict[mask_key]
        findings.append(
            Finding(
                "PD001",
                "error",
                name,
                f"{name} is stored as {orig_key} and {mask_key}; run 'prunedoctor normalize' "
                "to merge them into one tensor",
            )
        )
        if tuple(orig.shape) != tuple(mask.shape):
            findings.append(
                Finding(
                    "PD004",
                    "error",
                    mask_key,
                    f"{mask_key} has shape {tuple(mask.shape)} but {orig_key} has shape "
                    f"{tuple(orig.shape)}",
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
    mask_keys = [mask_key for _, mask_key in index.pairs.values()] + list(index.sidecar_masks.values())
    for mask_key in mask_keys:
        mask = state_dict[mask_key]
        if mask.is_complex() or not (mask.is_floating_point() or mask.dtype == torch.bool or _is_integer(mask)):
            findings.append(Finding("PD011", "error", mask_key, f"{mask_key} has dtype {mask.dtype}"))
        elif not is_binary_mask(mask):
            bad = int(torch.logical_not(torch.logical_or(mask == 0, mask == 1)).sum())
            findings.append(
                Finding(
                    "PD005",
                    "error",
                    mask_key,
                    f"{mask_key} has {bad} of {mask.numel()} entries that are neither 0 nor 1",
                )
            )
    for name, mask_key in index.sidecar_masks.items():
        weight, mask = state_dict[name], state_dict[mask_key]
        if tuple(weight.shape) != tuple(mask.shape):
            findings.append(
                Finding(
                    "PD004",
                    "error",
                    mask_key,
                    f"{mask_key} has shape {tuple(mask.shape)} but {name} has shape {tuple(weight.shape)}",
                )
            )
            continue
        revived = int(torch.logical_and(mask == 0, weight != 0).sum())
        if revived:
            findings.append(
                Finding(
                    "PD009",
                    "error",
                    name,
                    f"{name} is nonzero at {revived} entries where {mask_key} is 0: the mask was never "
                    "applied, or training revived those entries",
                )
            )
    return sorted(findings, key=lambda f: (f.key, f.code))


def _is_integer(tensor: torch.Tensor) -> bool:
    import torch

    return tensor.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
