"""Head and MLP-neuron pruning of timm ViTs: scores, budgets and structured masks.

Units are attention heads and MLP neurons. A unit's input side is its qkv
rows (head) or fc1 row (neuron), and its output side is its proj columns
(head) or fc2 column (neuron).

Criteria (scores per unit, from the effective weights ``W = orig * mask``):

- ``remain``: surviving mask entries of the input side;
- ``magnitude``: sum of ``|W|`` over the input side;
- ``l1``, ``l2``, ``saliency``: activation statistics of the unit's qkv or
  fc1 outputs on calibration data (:func:`compute_activation_scores`).

``include_output_side`` adds the output side to ``remain`` and
``magnitude``. A unit whose input side is entirely zero is ranked after
every live unit whatever its score, and ties keep the lower index, so the
choice is deterministic and keeps exactly the budgeted count.

Budgets: a ratio budget keeps ``max(min_keep, floor(U * (1 - ratio)))`` of
``U`` units. A refill budget first prunes ``rate`` of the surviving weights
of every qkv, proj, fc1 and fc2 matrix by global magnitude, which gives the
mask ``M``. A layer then keeps ``floor(n + (U - n) * refill_rate)`` units,
where ``n`` is the number of ``M``'s surviving input-side entries divided by
the entries of one unit's input side.

Kept units get masks of ones on both sides, so entries that ``M`` or the
old mask removed inside them come back (the "refill"). Pruned units get
masks of zeros.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

from prunedoctor.errors import DataError, StructureError
from prunedoctor.vit.arch import VitArchitecture, block_layer_names

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "CRITERIA",
    "SORTING_MODES",
    "TARGETS",
    "ACTIVATION_CRITERIA",
    "PruneConfig",
    "PruneResult",
    "prunable_weight_names",
    "global_magnitude_mask",
    "prune_units",
    "compute_activation_scores",
    "activation_score_key",
]

_logger = logging.getLogger(__name__)

CRITERIA = ("remain", "magnitude", "l1", "l2", "saliency")
ACTIVATION_CRITERIA = ("l1", "l2", "saliency")
SORTING_MODES = ("layer-wise", "global")
TARGETS = ("head", "mlp", "both")

_KINDS = ("head", "neuron")


@dataclass
class PruneConfig:
    """Scoring, sorting, target and budget settings of :func:`prune_units`.

    Attributes:
        criterion: ``remain``, ``magnitude``, ``l1``, ``l2`` or ``saliency``.
        sorting: ``layer-wise`` ranks units within each layer; ``global``
            ranks the units of all layers of one kind together.
        normalize_scores: With ``global`` sorting, divide each layer's
            scores by the layer's mean score before pooling.
        target: Units to prune: ``head``, ``mlp`` or ``both``.
        head_ratio: Ratio budget: fraction of heads to prune.
        mlp_ratio: Ratio budget: fraction of MLP neurons to prune.
        refill: Use the refill budget instead of the ratio budget.
        rate: Refill budget: fraction of the surviving weights that global
            magnitude pruning removes to build ``M``.
        refill_rate: Refill budget: fraction of the units beyond what ``M``'s
            surviving entries fill that are kept too (0 is Refill, above 0 Refill+).
        min_keep: Minimum units that each layer keeps (0 lets a layer lose all).
        mask_bias: Also mask the qkv and fc1 bias entries of pruned units.
        include_output_side: Add the output side to ``remain`` and ``magnitude`` scores.
    """

    criterion: str = "magnitude"
    sorting: str = "layer-wise"
    normalize_scores: bool = True
    target: str = "both"
    head_ratio: float = 0.0
    mlp_ratio: float = 0.0
    refill: bool = False
    rate: float = 0.3
    refill_rate: float = 0.0
    min_keep: int = 1
    mask_bias: bool = False
    include_output_side: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first field with an invalid value."""
        choices = {"criterion": CRITERIA, "sorting": SORTING_MODES, "target": TARGETS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is invalid; expected one of {', '.join(allowed)}")
        for name in ("head_ratio", "mlp_ratio", "rate", "refill_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} {value} is invalid; expected a fraction from 0 to 1")
        if self.min_keep < 0:
            raise ValueError(f"min_keep {self.min_keep} is invalid; expected 0 or more")

    @property
    def prunes_heads(self) -> bool:
        """Whether heads are in the target."""
        return self.target in ("head", "both")

    @property
    def prunes_neurons(self) -> bool:
        """Whether MLP neurons are in the target."""
        return self.target in ("mlp", "both")


@dataclass
class PruneResult:
    """Structured masks and the per-block choice that produced them.

    Attributes:
        masks: Parameter name -> 0/1 mask in the weight's dtype, for every
            qkv, proj, fc1 and fc2 weight (and the qkv and fc1 biases with
            ``mask_bias``). Layers outside the target keep ``M`` under a
            refill budget, else their current mask.
        kept_heads: Per block, indices of the heads kept (for a block
            outside the target: the heads that are not pruned).
        pruned_heads: Per block, indices of the heads pruned.
        kept_neurons: Per block, indices of the neurons kept.
        pruned_neurons: Per block, indices of the neurons pruned.
        normalization: What global sorting did to the scores, for the report.
        head_scores: Per block, the head scores that were ranked (after
            normalisation); empty lists when heads are not in the target.
        neuron_scores: Per block, the neuron scores that were ranked.
        head_budget: Per block, the number of heads kept by the budget
            (``None`` for blocks outside the target).
        neuron_budget: Per block, the number of neurons kept by the budget.
        refill_masks: The unstructured mask ``M`` of a refill budget, else None.
        config: The configuration used.
    """

    masks: dict[str, torch.Tensor]
    kept_heads: list[list[int]]
    pruned_heads: list[list[int]]
    kept_neurons: list[list[int]]
    pruned_neurons: list[list[int]]
    normalization: str
    head_scores: list[torch.Tensor] = field(default_factory=list)
    neuron_scores: list[torch.Tensor] = field(default_factory=list)
    head_budget: list[int | None] = field(default_factory=list)
    neuron_budget: list[int | None] = field(default_factory=list)
    refill_masks: dict[str, torch.Tensor] | None = None
    config: PruneConfig = field(default_factory=PruneConfig)


def prunable_weight_names(arch: VitArchitecture) -> list[str]:
    """Return the qkv, proj, fc1 and fc2 weight names of every block, block by block."""
    names: list[str] = []
    for block in range(arch.depth):
        layers = block_layer_names(block)
        names += [layers["qkv"], layers["proj"], layers["fc1"], layers["fc2"]]
    return names


def activation_score_key(block: int, kind: str) -> str:
    """Return the key of a layer's unit scores in :func:`compute_activation_scores`'s result.

    ``blocks.{i}.attn`` is the key of the head scores, ``blocks.{i}.mlp`` of the neuron scores.
    """
    return f"blocks.{block}.attn" if kind == "head" else f"blocks.{block}.mlp"


def _as_fraction(value: float) -> Fraction:
    # The shortest decimal of the float, so that 0.8 counts as 4/5 and
    # floor(10 * (1 - 0.8)) is 2, not the 1 that float arithmetic gives.
    return Fraction(repr(float(value)))


def _current_mask(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """Return the mask of ``name`` as a boolean tensor: the given mask, else the nonzero entries of the weight.

    Treating the zeros of a weight without a mask as pruned makes a
    checkpoint and its normalized twin (masks merged and dropped) prune alike.
    """
    weight = weights[name]
    mask = masks.get(name)
    if mask is None:
        return weight != 0
    if tuple(mask.shape) != tuple(weight.shape):
        raise StructureError(
            f"mask of {name} has shape {tuple(mask.shape)} but the weight has {tuple(weight.shape)}; "
            "the mask was saved for another layer"
        )
    return mask.to(weight.device) != 0


class _CurrentMasks(Mapping[str, "torch.Tensor"]):
    """Boolean current masks (see :func:`_current_mask`), computed on first access only."""

    def __init__(self, weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
        self._weights = weights
        self._masks = masks
        self._cache: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            self._cache[name] = _current_mask(self._weights, self._masks, name)
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)


def global_magnitude_mask(
    weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    names: list[str],
    rate: float,
) -> dict[str, torch.Tensor]:
    """Prune ``rate`` of the surviving entries of ``names`` together, smallest ``|W|`` first.

    This is global unstructured L1 pruning as ``torch.nn.utils.prune.global_unstructured``
    with ``L1Unstructured`` computes it: ``round(rate * surviving)`` entries
    are removed. Among entries of equal magnitude the one that comes later
    (in ``names`` order, then row-major) is removed first.

    Args:
        weights: Effective weights (``orig * mask``).
        masks: Current masks; a name without one counts its zero entries as pruned.
        names: Parameters to prune together.
        rate: Fraction of the surviving entries to remove, from 0 to 1.

    Returns:
        Parameter name -> new 0/1 mask in the weight's dtype. Entries pruned
        before stay pruned.
    """
    import torch

    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate {rate} is invalid; expected a fraction from 0 to 1")
    alive = {name: _current_mask(weights, masks, name) for name in names}
    values = torch.cat([weights[name].abs().float()[alive[name]] for name in names]) if names else torch.empty(0)
    surviving = values.numel()
    to_prune = round(rate * surviving)
    keep = torch.ones(surviving, dtype=torch.bool, device=values.device)
    if to_prune > 0:
        threshold = torch.kthvalue(values, to_prune).values
        below = values < threshold
        keep &= ~below
        ties = torch.nonzero(values == threshold).flatten()
        extra = to_prune - int(below.sum())
        if extra > 0:
            keep[ties[ties.numel() - extra :]] = False
    result: dict[str, torch.Tensor] = {}
    offset = 0
    for name in names:
        mask = alive[name].clone()
        count = int(mask.sum())
        mask[mask.clone()] = keep[offset : offset + count]
        offset += count
        result[name] = mask.to(weights[name].dtype)
    return result


@dataclass
class _Layer:
    """One layer's units: scores, liveness and how many to keep."""

    block: int
    kind: str
    scores: torch.Tensor
    dead: torch.Tensor
    keep_count: int = 0
    kept: torch.Tensor | None = None  # boolean per unit


def _accumulate_dtype(weight: torch.Tensor) -> torch.dtype:
    import torch

    return torch.promote_types(weight.dtype, torch.float32)


def _unit_sums(
    tensors: Mapping[str, torch.Tensor], arch: VitArchitecture, block: int, kind: str, side: str, *,
    absolute: bool = True,
) -> torch.Tensor:
    """Return per-unit sums over one side (``input`` or ``output``) of one layer.

    With ``absolute`` the sums are of ``|x|`` (for weights), else of ``x``
    itself in float64 (for 0/1 masks, which gives counts).
    """
    import torch

    layers = block_layer_names(block)
    if kind == "head":
        tensor = tensors[layers["qkv" if side == "input" else "proj"]]
    else:
        tensor = tensors[layers["fc1" if side == "input" else "fc2"]]
    dtype = _accumulate_dtype(tensor) if absolute else torch.float64
    values = tensor.abs() if absolute else tensor
    # Reduce whole rows or columns first (contiguous and fast), then group channels into heads.
    per_channel = values.sum(dim=1 if side == "input" else 0, dtype=dtype)
    if kind == "neuron":
        return per_channel
    heads, head_dim = arch.heads_per_block[block], arch.head_dim
    if side == "input":
        return per_channel.reshape(3, heads, head_dim).sum(dim=(0, 2))
    return per_channel.reshape(heads, head_dim).sum(dim=1)


def _unit_count(arch: VitArchitecture, block: int, kind: str) -> int:
    return arch.heads_per_block[block] if kind == "head" else arch.mlp_hidden[block]


def _input_entries_per_unit(arch: VitArchitecture, kind: str) -> int:
    return 3 * arch.head_dim * arch.embed_dim if kind == "head" else arch.embed_dim


def _score_layer(
    weights: Mapping[str, torch.Tensor],
    score_masks: Mapping[str, torch.Tensor],
    arch: VitArchitecture,
    block: int,
    kind: str,
    config: PruneConfig,
    activation_scores: Mapping[str, torch.Tensor] | None,
) -> _Layer:
    import torch

    magnitude_in = _unit_sums(weights, arch, block, kind, "input")
    dead = magnitude_in == 0
    if config.criterion == "magnitude":
        scores = magnitude_in
        if config.include_output_side:
            scores = scores + _unit_sums(weights, arch, block, kind, "output")
    elif config.criterion == "remain":
        scores = _unit_sums(score_masks, arch, block, kind, "input", absolute=False)
        if config.include_output_side:
            scores = scores + _unit_sums(score_masks, arch, block, kind, "output", absolute=False)
    else:
        key = activation_score_key(block, kind)
        if activation_scores is None or key not in activation_scores:
            raise ValueError(
                f"criterion {config.criterion!r} needs activation scores for {key}; "
                "compute them with compute_activation_scores"
            )
        scores = activation_scores[key].detach().to(device="cpu", dtype=torch.float64)
        expected = _unit_count(arch, block, kind)
        if scores.shape != (expected,):
            raise ValueError(f"activation scores of {key} have shape {tuple(scores.shape)}, expected ({expected},)")
    scores = torch.nan_to_num(scores.to(torch.float64), nan=float("-inf"))
    return _Layer(block, kind, scores, dead)


def _rank(scores: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """Return unit positions best first: live before dead, higher score first, lower position on ties."""
    import torch

    order = torch.sort(scores, descending=True, stable=True).indices
    return order[torch.sort(dead[order].to(torch.int8), stable=True).indices]


def _ratio_keep(units: int, ratio: float, min_keep: int) -> int:
    kept = int((units * (1 - _as_fraction(ratio))).__floor__())
    return min(units, max(min_keep, kept))


def _refill_keep(surviving: int, per_unit: int, units: int, refill_rate: float) -> int:
    paid = Fraction(surviving, per_unit)
    return min(units, int((paid + (units - paid) * _as_fraction(refill_rate)).__floor__()))


def _select_layer_wise(layers: list[_Layer]) -> None:
    import torch

    for layer in layers:
        order = _rank(layer.scores, layer.dead)
        kept = torch.zeros(layer.scores.numel(), dtype=torch.bool)
        kept[order[: layer.keep_count]] = True
        layer.kept = kept


def _normalize_by_mean(layers: list[_Layer]) -> None:
    for layer in layers:
        finite = layer.scores[layer.scores.isfinite()]
        mean = float(finite.mean()) if finite.numel() else 0.0
        if mean > 0:
            layer.scores = layer.scores / mean


def _select_global(layers: list[_Layer], total_keep: int, min_keep: int) -> None:
    """Keep ``total_keep`` units of all layers together, each layer keeping at least ``min_keep``."""
    import torch

    forced_count = 0
    for layer in layers:
        order = _rank(layer.scores, layer.dead)
        kept = torch.zeros(layer.scores.numel(), dtype=torch.bool)
        kept[order[: min(min_keep, layer.scores.numel())]] = True
        layer.kept = kept
        forced_count += int(kept.sum())
    remaining = max(0, total_keep - forced_count)
    if remaining and layers:
        scores = torch.cat([layer.scores for layer in layers])
        dead = torch.cat([layer.dead for layer in layers])
        already = torch.cat([layer.kept for layer in layers if layer.kept is not None])
        # Units already kept go last, so the pool ranks only the others.
        order = _rank(scores, dead | already)
        order = order[~already[order]]
        chosen = torch.zeros_like(already)
        chosen[order[:remaining]] = True
        offset = 0
        for layer in layers:
            count = layer.scores.numel()
            assert layer.kept is not None
            layer.kept |= chosen[offset : offset + count]
            offset += count
    for layer in layers:
        assert layer.kept is not None
        layer.keep_count = int(layer.kept.sum())


def _structured_masks(
    weights: Mapping[str, torch.Tensor], arch: VitArchitecture, layer: _Layer, mask_bias: bool
) -> dict[str, torch.Tensor]:
    """Return the masks of one layer's kept units: ones on both sides of a kept unit, zeros elsewhere."""
    assert layer.kept is not None
    layers = block_layer_names(layer.block)
    masks: dict[str, torch.Tensor] = {}
    if layer.kind == "head":
        inp_name, out_name = layers["qkv"], layers["proj"]
        per_channel = layer.kept.repeat_interleave(arch.head_dim)
        rows = per_channel.repeat(3)
    else:
        inp_name, out_name = layers["fc1"], layers["fc2"]
        per_channel = rows = layer.kept
    inp, out = weights[inp_name], weights[out_name]
    masks[inp_name] = rows.to(inp.dtype)[:, None].expand(inp.shape).contiguous()
    masks[out_name] = per_channel.to(out.dtype)[None, :].expand(out.shape).contiguous()
    if mask_bias:
        bias_name = inp_name[: -len("weight")] + "bias"
        if bias_name in weights:
            masks[bias_name] = rows.to(weights[bias_name].dtype)
    return masks


def _unit_indices(kept: torch.Tensor) -> tuple[list[int], list[int]]:
    import torch

    return torch.nonzero(kept).flatten().tolist(), torch.nonzero(~kept).flatten().tolist()


def _not_pruned(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], arch: VitArchitecture,
                block: int, kind: str) -> torch.Tensor:
    """Return per unit whether some entry of either side survives ``weights * masks``."""
    layers = block_layer_names(block)
    needed = ("qkv", "proj") if kind == "head" else ("fc1", "fc2")
    applied = {layers[k]: weights[layers[k]] * masks[layers[k]] for k in needed}
    inputs = _unit_sums(applied, arch, block, kind, "input")
    outputs = _unit_sums(applied, arch, block, kind, "output")
    return (inputs != 0) | (outputs != 0)


def _check_inputs(weights: Mapping[str, torch.Tensor], arch: VitArchitecture) -> None:
    problems = []
    for name in prunable_weight_names(arch):
        if name not in weights:
            problems.append(f"{name} missing")
    if problems:
        raise StructureError("cannot prune: " + ", ".join(sorted(problems)) + "; pass the effective weights")


def prune_units(
    weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    arch: VitArchitecture,
    config: PruneConfig,
    *,
    activation_scores: Mapping[str, torch.Tensor] | None = None,
) -> PruneResult:
    """Choose the heads and MLP neurons to keep and build their structured masks.

    Args:
        weights: Effective weights (``orig * mask``, from
            :func:`prunedoctor.reparam.effective_state_dict`), on the CPU.
        masks: Current masks, parameter name -> mask (may be empty), moved to
            the weights' device when they are elsewhere. A weight without a
            mask counts its zero entries as pruned.
        arch: Architecture from :func:`prunedoctor.vit.arch.infer_architecture`.
        config: Criterion, sorting, target and budget.
        activation_scores: Per-unit scores from :func:`compute_activation_scores`,
            required by the ``l1``, ``l2`` and ``saliency`` criteria.

    Returns:
        The masks and the kept and pruned units of every block.

    Raises:
        ValueError: The configuration is invalid, or an activation criterion
            has no scores.
        StructureError: A prunable weight is missing or a mask has the wrong shape.
    """
    config.validate()
    _check_inputs(weights, arch)
    names = prunable_weight_names(arch)
    current = _CurrentMasks(weights, masks)
    refill_masks = global_magnitude_mask(weights, masks, names, config.rate) if config.refill else None
    score_masks: Mapping[str, torch.Tensor] = refill_masks if refill_masks is not None else current

    by_kind: dict[str, list[_Layer]] = {}
    for kind in _KINDS:
        if not (config.prunes_heads if kind == "head" else config.prunes_neurons):
            continue
        layers = [
            _score_layer(weights, score_masks, arch, block, kind, config, activation_scores)
            for block in range(arch.depth)
        ]
        _choose_units(layers, arch, kind, config, score_masks)
        by_kind[kind] = layers

    structured: dict[str, torch.Tensor] = {}
    for layers in by_kind.values():
        for layer in layers:
            structured.update(_structured_masks(weights, arch, layer, config.mask_bias))
    result_masks: dict[str, torch.Tensor] = {}
    for name in names:
        if name in structured:
            result_masks[name] = structured[name]
        else:
            source = refill_masks[name] if refill_masks is not None else current[name]
            result_masks[name] = source.to(weights[name].dtype)
    result_masks.update({name: mask for name, mask in structured.items() if name not in result_masks})

    return _collect_result(weights, result_masks, arch, config, by_kind, refill_masks)


def _choose_units(
    layers: list[_Layer], arch: VitArchitecture, kind: str, config: PruneConfig, score_masks: Mapping[str, torch.Tensor]
) -> None:
    """Set ``keep_count`` and ``kept`` of every layer of one kind from the budget and the sorting mode."""
    units = [layer.scores.numel() for layer in layers]
    if config.refill:
        per_unit = _input_entries_per_unit(arch, kind)
        side = "qkv" if kind == "head" else "fc1"
        surviving = [int(score_masks[block_layer_names(layer.block)[side]].count_nonzero()) for layer in layers]
        per_layer = [_refill_keep(s, per_unit, u, config.refill_rate) for s, u in zip(surviving, units)]
        total = _refill_keep(sum(surviving), per_unit, sum(units), config.refill_rate)
    else:
        ratio = config.head_ratio if kind == "head" else config.mlp_ratio
        per_layer = [_ratio_keep(u, ratio, 0) for u in units]
        total = _ratio_keep(sum(units), ratio, 0)
    if config.sorting == "layer-wise":
        for layer, count, unit_count in zip(layers, per_layer, units):
            layer.keep_count = min(unit_count, max(min(config.min_keep, unit_count), count))
        _select_layer_wise(layers)
        return
    if config.normalize_scores:
        _normalize_by_mean(layers)
    _select_global(layers, total, config.min_keep)


def _normalization_note(config: PruneConfig) -> str:
    if config.sorting == "layer-wise":
        return "none: layer-wise sorting ranks units within each layer"
    if config.normalize_scores:
        return "per-layer mean: each layer's scores were divided by the layer's mean score before pooling"
    return "none: raw scores of all layers were pooled"


def _collect_result(
    weights: Mapping[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    arch: VitArchitecture,
    config: PruneConfig,
    by_kind: dict[str, list[_Layer]],
    refill_masks: dict[str, torch.Tensor] | None,
) -> PruneResult:
    lists: dict[str, tuple[list[list[int]], list[list[int]], list[torch.Tensor], list[int | None]]] = {}
    for kind in _KINDS:
        kept_lists: list[list[int]] = []
        pruned_lists: list[list[int]] = []
        scores: list[torch.Tensor] = []
        budget: list[int | None] = []
        for block in range(arch.depth):
            if kind in by_kind:
                layer = by_kind[kind][block]
                assert layer.kept is not None
                kept, pruned = _unit_indices(layer.kept)
                scores.append(layer.scores)
                budget.append(layer.keep_count)
            else:
                kept, pruned = _unit_indices(_not_pruned(weights, masks, arch, block, kind))
                budget.append(None)
            kept_lists.append(kept)
            pruned_lists.append(pruned)
        lists[kind] = (kept_lists, pruned_lists, scores, budget)
    return PruneResult(
        masks=masks,
        kept_heads=lists["head"][0],
        pruned_heads=lists["head"][1],
        kept_neurons=lists["neuron"][0],
        pruned_neurons=lists["neuron"][1],
        normalization=_normalization_note(config),
        head_scores=lists["head"][2],
        neuron_scores=lists["neuron"][2],
        head_budget=lists["head"][3],
        neuron_budget=lists["neuron"][3],
        refill_masks=refill_masks,
        config=config,
    )


def _blocks_of(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise StructureError("the model has no 'blocks'; expected a timm VisionTransformer")
    return list(blocks)  # type: ignore[arg-type]


def compute_activation_scores(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    criterion: str,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Score every head and MLP neuron from the model's activations on calibration batches.

    Forward hooks read the outputs ``a`` of each block's qkv layer (a head's
    ``3 * d`` channels) and fc1 layer (before the activation function).

    - ``l1``: mean of ``|a|`` over images, tokens and the unit's channels;
    - ``l2``: root mean square of ``a`` over the same;
    - ``saliency``: sum over images, tokens and channels of ``|a * dL/da|``,
      where ``L`` is the mean cross-entropy of a batch, from real gradients.

    The model runs in eval mode (restored afterwards), and no parameter
    gradient is computed or kept.

    Args:
        model: A timm ``VisionTransformer`` with the weights to score.
        batches: ``(images, labels)`` pairs; labels are used by ``saliency`` only.
        criterion: ``l1``, ``l2`` or ``saliency``.
        on_batch: Called with the number of batches done after each batch.

    Returns:
        ``blocks.{i}.attn`` -> float64 scores per head and ``blocks.{i}.mlp``
        -> float64 scores per neuron (see :func:`activation_score_key`).

    Raises:
        ValueError: The criterion is not an activation criterion.
        DataError: ``batches`` is empty.
    """
    import torch
    import torch.nn.functional as F

    if criterion not in ACTIVATION_CRITERIA:
        raise ValueError(f"criterion {criterion!r} is not an activation criterion; expected l1, l2 or saliency")
    blocks = _blocks_of(model)
    head_layout = []
    for block in blocks:
        heads = int(block.attn.num_heads)  # type: ignore[union-attr]
        channels = int(block.attn.qkv.out_features)  # type: ignore[union-attr]
        head_layout.append((heads, channels // (3 * heads) if heads else 0))

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    captured: dict[str, torch.Tensor] = {}

    def per_unit(key: str, values: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Return the per-unit sums of ``values`` and the number of entries summed per unit."""
        block = int(key.split(".")[1])
        if key.endswith(".attn"):
            heads, head_dim = head_layout[block]
            batch, tokens = values.shape[0], values.shape[1]
            grouped = values.reshape(batch, tokens, 3, heads, head_dim)
            return grouped.sum(dim=(0, 1, 2, 4), dtype=torch.float64), batch * tokens * 3 * head_dim
        flat = values.reshape(-1, values.shape[-1])
        return flat.sum(dim=0, dtype=torch.float64), flat.shape[0]

    def accumulate(key: str, values: torch.Tensor) -> None:
        total, entries = per_unit(key, values)
        sums[key] = sums[key] + total if key in sums else total
        counts[key] = counts.get(key, 0) + entries

    def make_hook(key: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            if criterion == "saliency":
                captured[key] = output
            elif criterion == "l1":
                accumulate(key, output.detach().abs())
            else:
                accumulate(key, output.detach().square())

        return hook

    handles = []
    for i, block in enumerate(blocks):
        qkv, fc1 = block.attn.qkv, block.mlp.fc1  # type: ignore[union-attr]
        handles.append(qkv.register_forward_hook(make_hook(activation_score_key(i, "head"))))
        handles.append(fc1.register_forward_hook(make_hook(activation_score_key(i, "neuron"))))
    was_training = model.training
    model.eval()
    done = 0
    try:
        for images, labels in batches:
            if criterion == "saliency":
                _accumulate_saliency(model, images, labels, captured, accumulate, F)
            else:
                with torch.no_grad():
                    model(images)
            done += 1
            if on_batch is not None:
                on_batch(done)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if done == 0:
        raise DataError("no calibration batches: the data set yielded no images")

    scores: dict[str, torch.Tensor] = {}
    for key, total in sums.items():
        if criterion == "l1":
            scores[key] = total / counts[key]
        elif criterion == "l2":
            scores[key] = (total / counts[key]).sqrt()
        else:
            scores[key] = total
    return scores


def _accumulate_saliency(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    captured: dict[str, torch.Tensor],
    accumulate: Callable[[str, torch.Tensor], None],
    functional: object,
) -> None:
    """Run one batch with gradients and add ``|a * dL/da|`` of every hooked output."""
    import torch

    captured.clear()
    with torch.enable_grad():
        # Gradients flow from the input, so every hooked output is in the
        # graph while the parameters need no gradient of their own.
        inputs = images.detach().clone().requires_grad_(True)
        flags = [p.requires_grad for p in model.parameters()]
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        try:
            logits = model(inputs)
            if isinstance(logits, tuple):
                logits = logits[0]
            loss = functional.cross_entropy(logits, labels)  # type: ignore[attr-defined]
            keys = list(captured)
            grads = torch.autograd.grad(loss, [captured[k] for k in keys])
        finally:
            for parameter, flag in zip(model.parameters(), flags):
                parameter.requires_grad_(flag)
    for key, grad in zip(keys, grads):
        accumulate(key, (captured[key].detach() * grad).abs())
    captured.clear()
