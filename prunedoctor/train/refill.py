"""The pruning step between two states: global magnitude mask ``M``, then Refill's structured masks.

Head and neuron selection is :func:`prunedoctor.vit.pruning.prune_units`;
this module only sets it up for the loop and converts its result.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from prunedoctor.train.config import RunConfig
from prunedoctor.vit.arch import VitArchitecture

__all__ = ["NextMasks", "choose_next_masks"]

ACTIVATION_CRITERIA = ("l1", "l2", "saliency")


@dataclass
class NextMasks:
    """Masks chosen for the next state.

    Attributes:
        structured: Parameter name -> 0/1 float32 mask of whole heads and neurons (``S``).
        unstructured: Parameter name -> 0/1 float32 global magnitude mask (``M``).
        kept_heads: Heads that ``S`` keeps, per block.
        kept_neurons: MLP neurons that ``S`` keeps, per block.
    """

    structured: dict[str, torch.Tensor]
    unstructured: dict[str, torch.Tensor]
    kept_heads: list[int]
    kept_neurons: list[int]


def choose_next_masks(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    arch: VitArchitecture,
    prunable: list[str],
    config: RunConfig,
    calibration: Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> NextMasks:
    """Prune ``config.rate`` of the surviving weights by magnitude and refill whole units.

    Args:
        model: The trained model; read only by the ``l1``, ``l2`` and ``saliency`` criteria.
        weights: Effective trained weights (``orig * mask``), plain names.
        masks: Masks that the state trained with.
        arch: Architecture of the model.
        prunable: qkv, proj, fc1 and fc2 weight names.
        config: Criterion, sorting, target, rate and refill rate.
        calibration: ``(images, labels)`` batches for the activation criteria.

    Raises:
        RuntimeError: ``prune_units`` returned no unstructured mask (a bug).
    """
    from prunedoctor.vit.pruning import PruneConfig, compute_activation_scores, prune_units

    prune_config = PruneConfig(
        criterion=config.criterion,
        sorting=config.sorting,
        normalize_scores=True,
        target=config.target,
        refill=True,
        rate=config.rate,
        refill_rate=config.refill_rate,
        min_keep=1,
        mask_bias=False,
    )
    cpu_weights = {name: tensor.detach().cpu() for name, tensor in weights.items()}
    scores = None
    if config.criterion in ACTIVATION_CRITERIA:
        scores = compute_activation_scores(model, calibration, config.criterion)
    result = prune_units(cpu_weights, masks, arch, prune_config, activation_scores=scores)
    if result.refill_masks is None:
        raise RuntimeError("prune_units returned no unstructured mask for a refill budget")
    return NextMasks(
        structured={name: result.masks[name].detach().to("cpu", torch.float32) for name in prunable},
        unstructured={name: result.refill_masks[name].detach().to("cpu", torch.float32) for name in prunable},
        kept_heads=[len(result.kept_heads[block]) for block in range(arch.depth)],
        kept_neurons=[len(result.kept_neurons[block]) for block in range(arch.depth)],
    )
