"""Masks on a live model: apply them with ``torch.nn.utils.prune``, reset to the rewind point, count them.

Masks are keyed by parameter name (``blocks.0.attn.qkv.weight``). Effective
weights are always read through :mod:`prunedoctor.reparam`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import prune

from prunedoctor.reparam import effective_state_dict, masks_of

__all__ = [
    "ones_masks",
    "apply_masks",
    "remove_reparametrization",
    "reset_to_rewind_point",
    "snapshot_weights",
    "current_masks",
    "effective_weights",
    "remaining_fraction",
    "hash_masks",
    "is_subset_mask",
]


def _split_name(name: str) -> tuple[str, str]:
    module_name, _, attribute = name.rpartition(".")
    return module_name, attribute


def ones_masks(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Return all-ones masks (float32, on the CPU) for the named parameters."""
    weights = effective_weights(model)
    return {name: torch.ones_like(weights[name], dtype=torch.float32, device="cpu") for name in names}


def remove_reparametrization(model: nn.Module, names: Iterable[str]) -> None:
    """Make ``orig * mask`` permanent with ``prune.remove`` for every named parameter that has a mask.

    Each ``X_orig`` parameter and ``X_mask`` buffer is replaced by a plain parameter ``X``.
    """
    for name in names:
        module_name, attribute = _split_name(name)
        module = model.get_submodule(module_name)
        if prune.is_pruned(module) and hasattr(module, attribute + "_mask"):
            prune.remove(module, attribute)


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Apply each mask with ``prune.custom_from_mask``, replacing any mask that was there.

    Each named parameter ``X`` becomes the parameter ``X_orig`` and the buffer
    ``X_mask`` (a copy of the mask in the parameter's dtype and device), and its
    module gets the forward pre-hook that computes ``X = X_orig * X_mask``. A
    previous mask is removed first with ``prune.remove`` so that masks replace,
    not multiply, each other.
    """
    remove_reparametrization(model, masks)
    for name, mask in masks.items():
        module_name, attribute = _split_name(name)
        module = model.get_submodule(module_name)
        weight = getattr(module, attribute)
        prune.custom_from_mask(module, attribute, mask.to(device=weight.device, dtype=weight.dtype))


def snapshot_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return a deep copy of the model's effective weights with plain names, on the CPU.

    The copy shares no storage with the model, so later training cannot change it.
    """
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in effective_weights(model).items()}


def reset_to_rewind_point(
    model: nn.Module, rewind: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
) -> None:
    """Load a fresh copy of the rewind point into the model, then apply ``masks``.

    The reparametrization is removed first, every parameter and buffer is
    overwritten from ``rewind`` (plain names, strict), and the masks are then
    applied with ``prune.custom_from_mask``.
    """
    remove_reparametrization(model, masks)
    model.load_state_dict({name: tensor.clone() for name, tensor in rewind.items()}, strict=True)
    apply_masks(model, masks)


def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the model's state dict with every ``X_orig``/``X_mask`` pair merged into ``X``."""
    return effective_state_dict(model.state_dict())


def current_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return parameter name -> float32 CPU copy of the mask applied to it."""
    return {name: mask.detach().to("cpu", torch.float32, copy=True) for name, mask in masks_of(model.state_dict()).items()}


def remaining_fraction(masks: Mapping[str, torch.Tensor]) -> float:
    """Return the fraction of mask entries that are nonzero (1.0 for no masks)."""
    total = sum(mask.numel() for mask in masks.values())
    if total == 0:
        return 1.0
    kept = sum(int(torch.count_nonzero(mask)) for mask in masks.values())
    return kept / total


def hash_masks(masks: Mapping[str, torch.Tensor]) -> str:
    """Return a SHA-256 over the names, shapes and nonzero patterns of the masks, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(masks):
        mask = masks[name]
        digest.update(name.encode())
        digest.update(str(tuple(mask.shape)).encode())
        digest.update((mask != 0).to(torch.uint8).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def is_subset_mask(inner: Mapping[str, torch.Tensor], outer: Mapping[str, torch.Tensor]) -> bool:
    """Return whether every entry kept by ``inner`` is also kept by ``outer``."""
    for name, mask in inner.items():
        if name not in outer:
            return False
        if bool(torch.logical_and(mask != 0, outer[name] == 0).any()):
            return False
    return True
