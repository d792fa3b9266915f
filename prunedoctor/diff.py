"""Compare two checkpoints: keys, shapes, values, masks, heads and neurons, sparsity.

By default both sides are compared in their effective view (``orig * mask``
merged, masks dropped), so a reparametrized checkpoint equals its
normalized twin. The raw view compares the keys as they are in the files.

Masks are compared in both views. Where a side stores no mask, its pruning
is read from the zeros of its effective weight, which is how a normalized
file records its pruning (see :func:`compare_masks`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from prunedoctor.errors import StructureError
from prunedoctor.reparam import effective_state_dict, index_reparametrization, masks_of
from prunedoctor.vit.arch import infer_paired_architectures
from prunedoctor.vit.structure import build_vit_report

if TYPE_CHECKING:
    import torch

__all__ = ["compare_tensors", "compare_masks", "compare_units", "diff_state_dicts"]

_logger = logging.getLogger(__name__)

SPARSITY_SCOPE_VIT = "qkv, proj, fc1 and fc2 weights"
SPARSITY_SCOPE_ALL = "all floating-point tensors with 2 or more dimensions"


def compare_tensors(a: torch.Tensor, b: torch.Tensor, *, atol: float = 0.0, rtol: float = 0.0) -> dict[str, Any]:
    """Compare two tensors of the same shape entry by entry, in float64.

    Returns:
        ``max_abs`` (largest ``|a - b|``), ``rel_l2`` (``||a - b||_2`` divided
        by the larger of ``||a||_2`` and ``||b||_2``, 0 when both are zero),
        ``changed`` (entries that differ at all) and ``within_tolerance``
        (every entry satisfies ``|a - b| <= atol + rtol * |b|``, NaN equal to NaN).
    """
    import torch

    left = a.detach().to(torch.float64)
    right = b.detach().to(torch.float64)
    both_nan = left.isnan() & right.isnan()
    delta = torch.where(both_nan, torch.zeros_like(left), left - right)
    changed = int(torch.count_nonzero(delta != 0)) if delta.numel() else 0
    if not changed:
        return {"max_abs": 0.0, "rel_l2": 0.0, "changed": 0, "within_tolerance": True}
    max_abs = float(delta.abs().max())
    norm = max(float(torch.linalg.vector_norm(left)), float(torch.linalg.vector_norm(right)))
    rel_l2 = float(torch.linalg.vector_norm(delta)) / norm if norm > 0 else 0.0
    within = bool(torch.isclose(left, right, rtol=rtol, atol=atol, equal_nan=True).all())
    return {
        "max_abs": max_abs if math.isfinite(max_abs) else None,
        "rel_l2": rel_l2 if math.isfinite(rel_l2) else None,
        "changed": changed,
        "within_tolerance": within,
    }


def _pruned_entries(
    effective: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], name: str,
) -> torch.Tensor | None:
    """Return the boolean "pruned" pattern of a parameter: its mask's zeros, else its weight's zeros."""
    if name in masks:
        return masks[name] == 0
    if name in effective:
        return effective[name] == 0
    return None


def _compared_names(
    masks_a: Mapping[str, torch.Tensor],
    masks_b: Mapping[str, torch.Tensor],
    effective_a: Mapping[str, torch.Tensor],
    effective_b: Mapping[str, torch.Tensor],
) -> list[str]:
    """Return the parameters with a mask on either side, and the floating-point tensors of 2+ dims in both."""
    names = set(masks_a) | set(masks_b)
    for name, tensor in effective_a.items():
        other = effective_b.get(name)
        if other is not None and tensor.is_floating_point() and other.is_floating_point() and tensor.dim() >= 2:
            names.add(name)
    return sorted(names)


def compare_masks(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Count entries newly pruned and revived from ``a`` to ``b``, per parameter.

    An entry is pruned where its stored mask is 0. Where a side stores no
    mask for a parameter, its pruning is read from the zeros of its
    effective weight. Such a zero is ambiguous, because a kept weight can be
    exactly 0. So against an inferred ``b`` an entry counts as newly pruned
    only where ``a``'s effective value is nonzero, and against an inferred
    ``a`` as revived only where ``b``'s effective value is nonzero. Where both
    sides store masks, the masks are compared exactly.

    Args:
        a: Raw state dict of the first checkpoint.
        b: Raw state dict of the second checkpoint.

    Returns:
        One entry per parameter whose pruned entries changed: ``param``,
        ``entries``, ``newly_pruned`` (pruned in ``b``, not in ``a``) and
        ``revived`` (pruned in ``a``, not in ``b``). Parameters compared are
        those with a mask on either side and the floating-point tensors with
        2 or more dimensions on both sides.
    """
    masks_a, masks_b = masks_of(a), masks_of(b)
    effective_a, effective_b = effective_state_dict(a), effective_state_dict(b)
    changes = []
    for name in _compared_names(masks_a, masks_b, effective_a, effective_b):
        pruned_a = _pruned_entries(effective_a, masks_a, name)
        pruned_b = _pruned_entries(effective_b, masks_b, name)
        if pruned_a is None or pruned_b is None or pruned_a.shape != pruned_b.shape:
            continue
        newly_pattern = pruned_b & ~pruned_a
        revived_pattern = pruned_a & ~pruned_b
        if name not in masks_b and name in effective_a and effective_a[name].shape == pruned_b.shape:
            newly_pattern &= effective_a[name] != 0
        if name not in masks_a and name in effective_b and effective_b[name].shape == pruned_a.shape:
            revived_pattern &= effective_b[name] != 0
        newly = int(newly_pattern.sum())
        revived = int(revived_pattern.sum())
        if newly or revived:
            changes.append({"param": name, "entries": pruned_a.numel(), "newly_pruned": newly, "revived": revived})
    return changes


def compare_units(report_a: Mapping[str, Any], report_b: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Return per block the heads and neurons pruned and revived from ``report_a`` to ``report_b``.

    A unit is pruned when both of its sides are zero. "Pruned" lists units
    pruned in ``b`` but not in ``a``; "revived" lists units pruned in ``a``
    but not in ``b``. Both reports must have the same unit counts.
    """
    blocks = []
    for before, after in zip(report_a["blocks"], report_b["blocks"]):
        heads_a, heads_b = set(before["heads"]["pruned"]), set(after["heads"]["pruned"])
        neurons_a = set(before["neurons"]["pruned_indices"])
        neurons_b = set(after["neurons"]["pruned_indices"])
        blocks.append(
            {
                "index": after["index"],
                "heads_pruned": sorted(heads_b - heads_a),
                "heads_revived": sorted(heads_a - heads_b),
                "neurons_pruned": sorted(neurons_b - neurons_a),
                "neurons_revived": sorted(neurons_a - neurons_b),
            }
        )
    return blocks


def _sparsity(tensors: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    zeros = entries = 0
    for tensor in tensors.values():
        if tensor.is_floating_point() and tensor.dim() >= 2:
            entries += tensor.numel()
            zeros += tensor.numel() - int(tensor.count_nonzero())
    return zeros, entries


def _structure_section(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    effective_a: Mapping[str, torch.Tensor],
    effective_b: Mapping[str, torch.Tensor],
    heads: int | None,
    model_name: str | None,
    args_a: Mapping[str, Any] | None,
    args_b: Mapping[str, Any] | None,
) -> tuple[dict[str, Any] | None, str | None]:
    """Return the head/neuron comparison, or None and the reason it does not apply."""
    try:
        arch_a, arch_b = infer_paired_architectures(effective_a, effective_b, heads=heads, model_name=model_name,
                                                    args_a=args_a, args_b=args_b)
    except StructureError as error:
        return None, str(error)
    if (arch_a.depth, arch_a.heads_per_block, arch_a.mlp_hidden) != (
        arch_b.depth,
        arch_b.heads_per_block,
        arch_b.mlp_hidden,
    ):
        return None, "A and B have different block counts or unit counts, so unit indices do not correspond"
    report_a = build_vit_report(effective_a, masks_of(a), arch_a)
    report_b = build_vit_report(effective_b, masks_of(b), arch_b)
    return {
        "heads": arch_a.num_heads,
        "heads_source": arch_a.heads_source if arch_a.heads_source == arch_b.heads_source
        else f"A: {arch_a.heads_source}; B: {arch_b.heads_source}",
        "heads_assumed": arch_a.heads_assumed or arch_b.heads_assumed,
        "blocks": compare_units(report_a, report_b),
        "sparsity_a": (report_a["zeros"], report_a["entries"]),
        "sparsity_b": (report_b["zeros"], report_b["entries"]),
    }, None


def diff_state_dicts(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    *,
    raw: bool = False,
    atol: float = 0.0,
    rtol: float = 0.0,
    heads: int | None = None,
    model_name: str | None = None,
    args_a: Mapping[str, Any] | None = None,
    args_b: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Compare two state dicts and return a JSON-able report.

    Args:
        a: Raw state dict of the first checkpoint (pairs kept as in the file).
        b: Raw state dict of the second checkpoint.
        raw: Compare the keys as they are instead of the effective views.
        atol: Absolute tolerance for values.
        rtol: Relative tolerance for values, relative to ``b``.
        heads: Head count for the structure comparison.
        model_name: timm model name to take the head count from.
        args_a: Saved training arguments of ``a`` (a source of the head count).
        args_b: Saved training arguments of ``b``.

    Returns:
        A dict with these keys:

        - ``equal``: true when no key, shape, dtype, value beyond tolerance or
          mask entry differs;
        - ``view``, ``atol``, ``rtol``, ``keys_compared``, ``only_in_a``, ``only_in_b``;
        - ``shape_changes`` and ``dtype_changes``;
        - ``tensors``: every tensor whose values differ, with ``max_abs``,
          ``rel_l2``, ``changed`` and ``within_tolerance``, and ``identical``,
          the count of tensors equal bit for bit;
        - ``masks`` (see :func:`compare_masks`);
        - ``structure``: heads and neurons pruned and revived per block, or
          None with the reason in ``structure_note``;
        - ``sparsity``.

    Raises:
        ReparametrizationError: An orig/mask pair cannot be merged.
        ValueError: A tolerance is negative.
    """
    if atol < 0 or rtol < 0:
        raise ValueError(f"tolerances must be 0 or more, got atol={atol}, rtol={rtol}")
    effective_a = effective_state_dict(a, index_reparametrization(a.keys()))
    effective_b = effective_state_dict(b, index_reparametrization(b.keys()))
    left, right = (a, b) if raw else (effective_a, effective_b)

    only_a = [key for key in left if key not in right]
    only_b = [key for key in right if key not in left]
    shape_changes, dtype_changes, tensors = [], [], []
    identical = 0
    for key in left:
        if key not in right:
            continue
        ta, tb = left[key], right[key]
        if tuple(ta.shape) != tuple(tb.shape):
            shape_changes.append({"key": key, "a": list(ta.shape), "b": list(tb.shape)})
            continue
        if ta.dtype != tb.dtype:
            dtype_changes.append({"key": key, "a": str(ta.dtype).removeprefix("torch."),
                                  "b": str(tb.dtype).removeprefix("torch.")})
        values = compare_tensors(ta, tb, atol=atol, rtol=rtol)
        if values["changed"]:
            tensors.append({"key": key, **values})
        else:
            identical += 1
    masks = compare_masks(a, b)
    structure, structure_note = _structure_section(a, b, effective_a, effective_b, heads, model_name, args_a, args_b)
    sparsity = _sparsity_section(structure, effective_a, effective_b)
    if structure is not None:
        del structure["sparsity_a"], structure["sparsity_b"]
    equal = not (
        only_a or only_b or shape_changes or dtype_changes or masks
        or any(not t["within_tolerance"] for t in tensors)
    )
    return {
        "equal": equal,
        "view": "raw" if raw else "effective",
        "atol": atol,
        "rtol": rtol,
        "keys_compared": len([key for key in left if key in right]),
        "only_in_a": only_a,
        "only_in_b": only_b,
        "shape_changes": shape_changes,
        "dtype_changes": dtype_changes,
        "tensors": tensors,
        "identical": identical,
        "masks": masks,
        "structure": structure,
        "structure_note": structure_note,
        "sparsity": sparsity,
    }


def _sparsity_section(
    structure: Mapping[str, Any] | None,
    effective_a: Mapping[str, torch.Tensor],
    effective_b: Mapping[str, torch.Tensor],
) -> dict[str, Any]:
    if structure is not None:
        (zeros_a, entries_a), (zeros_b, entries_b) = structure["sparsity_a"], structure["sparsity_b"]
        scope = SPARSITY_SCOPE_VIT
    else:
        (zeros_a, entries_a), (zeros_b, entries_b) = _sparsity(effective_a), _sparsity(effective_b)
        scope = SPARSITY_SCOPE_ALL
    value_a = zeros_a / entries_a if entries_a else 0.0
    value_b = zeros_b / entries_b if entries_b else 0.0
    return {"scope": scope, "a": value_a, "b": value_b, "change": value_b - value_a,
            "zeros_a": zeros_a, "zeros_b": zeros_b, "entries_a": entries_a, "entries_b": entries_b}
