"""State dicts that ``prune`` writes, and the JSON report of a pruning run."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from prunedoctor.reparam import MASK_SUFFIX, ORIG_SUFFIX
from prunedoctor.vit.arch import VitArchitecture
from prunedoctor.vit.pruning import PruneResult

if TYPE_CHECKING:
    import torch

__all__ = ["to_reparametrized", "to_normalized", "to_mask_file", "build_prune_report"]


def _module_of(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def to_reparametrized(
    weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Return the state dict that ``torch.nn.utils.prune.custom_from_mask`` would save.

    Every masked parameter ``X`` becomes ``X_orig`` (the effective weight, as
    if ``prune.remove`` had run first) and ``X_mask``. Within one module the
    order matches torch's: unmasked tensors in their order, then the
    ``_orig`` parameters, then the ``_mask`` buffers. ``X`` itself is dropped.
    """
    result: dict[str, torch.Tensor] = {}
    keys = list(weights)
    start = 0
    while start < len(keys):
        module = _module_of(keys[start])
        end = start
        while end < len(keys) and _module_of(keys[end]) == module:
            end += 1
        group = keys[start:end]
        plain = [key for key in group if key not in masks]
        pruned = [key for key in group if key in masks]
        for key in plain:
            result[key] = weights[key]
        for key in pruned:
            result[key + ORIG_SUFFIX] = weights[key]
        for key in pruned:
            result[key + MASK_SUFFIX] = masks[key]
        start = end
    return result


def to_normalized(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return the weights with the masks applied (``weight * mask``) and no mask keys."""
    return {key: (tensor * masks[key].to(tensor.dtype) if key in masks else tensor) for key, tensor in weights.items()}


def to_mask_file(masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return the masks keyed ``X_mask``, so that merging them into a normalized file gives sidecar masks."""
    return {key + MASK_SUFFIX: mask for key, mask in masks.items()}


def _scores_list(scores: torch.Tensor) -> list[float | None]:
    return [float(s) if s == s and abs(float(s)) != float("inf") else None for s in scores.tolist()]


def build_prune_report(
    result: PruneResult,
    arch: VitArchitecture,
    before: Mapping[str, Any],
    after: Mapping[str, Any],
) -> dict[str, Any]:
    """Describe a pruning run as a JSON-able dict.

    Args:
        result: What :func:`prunedoctor.vit.pruning.prune_units` returned.
        arch: The architecture.
        before: Structure report of the input (:func:`prunedoctor.vit.structure.build_vit_report`).
        after: Structure report of the output.

    Returns:
        A dict with these keys:

        - ``config``, ``normalization`` and ``architecture``;
        - ``blocks``, one entry per block: ``heads`` with ``kept``, ``pruned``,
          ``budget`` and ``scores``, and ``neurons`` with ``kept`` and
          ``pruned`` counts, ``budget`` and ``pruned_indices``;
        - ``sparsity``, ``params`` and ``flops``, before and after;
        - ``refill``: the sparsity of the unstructured mask ``M`` under a
          refill budget, else None.
    """
    blocks = []
    for block in range(arch.depth):
        heads: dict[str, Any] = {
            "kept": result.kept_heads[block],
            "pruned": result.pruned_heads[block],
            "budget": result.head_budget[block],
        }
        if result.head_scores:
            heads["scores"] = _scores_list(result.head_scores[block])
        neurons: dict[str, Any] = {
            "total": arch.mlp_hidden[block],
            "kept": len(result.kept_neurons[block]),
            "pruned": len(result.pruned_neurons[block]),
            "budget": result.neuron_budget[block],
            "pruned_indices": result.pruned_neurons[block],
        }
        blocks.append({"index": block, "heads": heads, "neurons": neurons})
    refill = None
    if result.refill_masks is not None:
        zeros = sum(int((m == 0).sum()) for m in result.refill_masks.values())
        entries = sum(m.numel() for m in result.refill_masks.values())
        refill = {"unstructured_sparsity": zeros / entries if entries else 0.0, "zeros": zeros, "entries": entries}
    return {
        "config": asdict(result.config),
        "normalization": result.normalization,
        "architecture": {
            "depth": arch.depth,
            "embed_dim": arch.embed_dim,
            "heads": arch.num_heads,
            "head_dim": arch.head_dim,
            "heads_source": arch.heads_source,
            "mlp_hidden": list(arch.mlp_hidden),
        },
        "blocks": blocks,
        "refill": refill,
        "sparsity": {
            "scope": "qkv, proj, fc1 and fc2 weights",
            "before": before["sparsity"],
            "after": after["sparsity"],
        },
        "params": {"before": before["params"], "after": after["params"]},
        "flops": {"before": before["flops"], "after": after["flops"]},
    }
