"""Golden and property tests of head/MLP pruning: criteria, sorting modes, budgets, masks."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import torch.nn.utils.prune as prune
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.models.vision_transformer import VisionTransformer

from prunedoctor.reparam import effective_state_dict, masks_of
from prunedoctor.vit.arch import VitArchitecture, infer_architecture
from prunedoctor.vit.export import to_reparametrized
from prunedoctor.vit.pruning import (
    PruneConfig,
    PruneResult,
    global_magnitude_mask,
    prunable_weight_names,
    prune_units,
)

WIDTH, HEADS, HEAD_DIM, NEURONS = 8, 4, 2, 6


def hand_built(
    head_in: Sequence[Sequence[float]],
    head_out: Sequence[Sequence[float]] | None = None,
    neuron_in: Sequence[Sequence[float]] | None = None,
    neuron_out: Sequence[Sequence[float]] | None = None,
) -> tuple[dict[str, torch.Tensor], VitArchitecture]:
    """Return a real timm ViT state dict whose unit sides hold constant values, and its architecture.

    Width 8, 4 heads of width 2, 6 MLP neurons. Every entry of head ``h``'s
    qkv rows in block ``b`` is ``head_in[b][h]``. Proj columns contain
    ``head_out``, fc1 rows ``neuron_in`` and fc2 columns ``neuron_out``, each
    1 by default.
    """
    depth = len(head_in)
    torch.manual_seed(0)
    model = VisionTransformer(img_size=8, patch_size=4, embed_dim=WIDTH, depth=depth, num_heads=HEADS,
                              mlp_ratio=NEURONS / WIDTH, num_classes=3)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for b in range(depth):
        qkv = torch.zeros(3 * WIDTH, WIDTH)
        proj = torch.zeros(WIDTH, WIDTH)
        for h in range(HEADS):
            for part in range(3):
                qkv[part * WIDTH + h * HEAD_DIM : part * WIDTH + (h + 1) * HEAD_DIM] = head_in[b][h]
            proj[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] = 1.0 if head_out is None else head_out[b][h]
        fc1 = torch.ones(NEURONS, WIDTH)
        fc2 = torch.ones(WIDTH, NEURONS)
        for n in range(NEURONS):
            if neuron_in is not None:
                fc1[n] = neuron_in[b][n]
            if neuron_out is not None:
                fc2[:, n] = neuron_out[b][n]
        sd[f"blocks.{b}.attn.qkv.weight"] = qkv
        sd[f"blocks.{b}.attn.proj.weight"] = proj
        sd[f"blocks.{b}.mlp.fc1.weight"] = fc1
        sd[f"blocks.{b}.mlp.fc2.weight"] = fc2
    return sd, infer_architecture(sd, heads=HEADS)


def run(weights: dict[str, torch.Tensor], arch: VitArchitecture, masks: dict[str, torch.Tensor] | None = None,
        **config: object) -> PruneResult:
    return prune_units(weights, masks or {}, arch, PruneConfig(**config))  # type: ignore[arg-type]


# --- golden: magnitude, sorting modes, ratio budget ---------------------------------


def test_layer_wise_magnitude_heads() -> None:
    sd, arch = hand_built([[4, 1, 3, 2], [1, 1, 2, 1]])
    result = run(sd, arch, target="head", head_ratio=0.5)
    assert result.kept_heads == [[0, 2], [0, 2]]
    assert result.pruned_heads == [[1, 3], [1, 3]]
    assert result.head_budget == [2, 2]


def test_layer_wise_magnitude_neurons() -> None:
    sd, arch = hand_built([[1] * 4, [1] * 4], neuron_in=[[6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6]])
    result = run(sd, arch, target="mlp", mlp_ratio=0.5)
    assert result.kept_neurons == [[0, 1, 2], [3, 4, 5]]
    assert result.pruned_neurons == [[3, 4, 5], [0, 1, 2]]


def test_global_raw_scores() -> None:
    sd, arch = hand_built([[4, 1, 3, 2], [10, 20, 30, 40]])
    result = run(sd, arch, target="head", head_ratio=0.5, sorting="global", normalize_scores=False)
    assert result.kept_heads == [[0], [1, 2, 3]]
    assert result.normalization == "none: raw scores of all layers were pooled"


def test_global_normalized_scores() -> None:
    """Divided by the layer mean, block 0 scores 1.6, .4, 1.2, .8 and block 1 .4, .8, 1.2, 1.6."""
    sd, arch = hand_built([[4, 1, 3, 2], [10, 20, 30, 40]])
    result = run(sd, arch, target="head", head_ratio=0.5, sorting="global")
    assert result.kept_heads == [[0, 2], [2, 3]]
    assert result.normalization.startswith("per-layer mean")


def test_global_min_keep_forces_weak_layer() -> None:
    sd, arch = hand_built([[1, 1, 1, 1], [10, 20, 30, 40]])
    result = run(sd, arch, target="head", head_ratio=0.75, sorting="global", normalize_scores=False)
    assert result.kept_heads == [[0], [3]]


def test_ratio_one_keeps_min_keep() -> None:
    sd, arch = hand_built([[4, 1, 3, 2], [1, 1, 2, 1]])
    result = run(sd, arch, target="head", head_ratio=1.0, min_keep=1)
    assert result.kept_heads == [[0], [2]]


def test_min_keep_zero_prunes_all() -> None:
    sd, arch = hand_built([[4, 1, 3, 2], [1, 1, 2, 1]])
    result = run(sd, arch, target="head", head_ratio=1.0, min_keep=0)
    assert result.kept_heads == [[], []]


def test_decimal_ratio_floors_exactly() -> None:
    """floor(10 * (1 - 0.8)) is 2, although float arithmetic gives 1.9999999999999996 and so 1."""
    sd, arch = hand_built([[1] * 4])
    neurons = torch.ones(10, WIDTH)
    arch10 = VitArchitecture(**{**arch.__dict__, "mlp_hidden": (10,)})
    sd["blocks.0.mlp.fc1.weight"] = neurons
    sd["blocks.0.mlp.fc2.weight"] = torch.ones(WIDTH, 10)
    result = run(sd, arch10, target="mlp", mlp_ratio=0.8)
    assert result.neuron_budget == [2]


def test_include_output_side() -> None:
    sd, arch = hand_built([[1, 1, 1, 1]], head_out=[[0.1, 5, 0.1, 0.1]])
    assert run(sd, arch, target="head", head_ratio=0.75).kept_heads == [[0]]
    assert run(sd, arch, target="head", head_ratio=0.75, include_output_side=True).kept_heads == [[1]]


def test_remain_counts_mask_entries() -> None:
    sd, arch = hand_built([[1, 1, 1, 1]])
    mask = torch.ones(3 * WIDTH, WIDTH)
    flat_rows = {0: 10, 1: 0, 2: 20, 3: 5}  # entries masked per head
    for head, count in flat_rows.items():
        rows = mask[head * HEAD_DIM : (head + 1) * HEAD_DIM]  # q rows of the head
        rows.view(-1)[:count] = 0
    masks = {"blocks.0.attn.qkv.weight": mask}
    weights = {**sd, "blocks.0.attn.qkv.weight": sd["blocks.0.attn.qkv.weight"] * mask}
    result = run(weights, arch, masks, criterion="remain", target="head", head_ratio=0.5)
    assert result.kept_heads == [[1, 3]]


def test_activation_scores_rank_heads() -> None:
    sd, arch = hand_built([[1, 1, 1, 1]])
    scores = {"blocks.0.attn": torch.tensor([0.1, 0.9, 0.5, 0.2])}
    result = prune_units(sd, {}, arch, PruneConfig(criterion="l1", target="head", head_ratio=0.5),
                         activation_scores=scores)
    assert result.kept_heads == [[1, 2]]


def test_dead_head_ranked_last_by_activation() -> None:
    """A head whose qkv rows are zero loses to live heads even with a higher activation score."""
    sd, arch = hand_built([[1, 0, 1, 1]])
    scores = {"blocks.0.attn": torch.tensor([0.1, 0.9, 0.5, 0.2])}
    result = prune_units(sd, {}, arch, PruneConfig(criterion="saliency", target="head", head_ratio=0.5),
                         activation_scores=scores)
    assert result.kept_heads == [[2, 3]]


def test_activation_criterion_needs_scores() -> None:
    sd, arch = hand_built([[1, 1, 1, 1]])
    with pytest.raises(ValueError, match="criterion 'l2' needs activation scores for blocks.0.attn"):
        run(sd, arch, criterion="l2", target="head", head_ratio=0.5)


def test_invalid_config_rejected() -> None:
    sd, arch = hand_built([[1, 1, 1, 1]])
    with pytest.raises(ValueError, match="sorting 'random' is invalid"):
        run(sd, arch, sorting="random")
    with pytest.raises(ValueError, match="head_ratio 1.5 is invalid"):
        run(sd, arch, head_ratio=1.5)


def test_orig_of_pruned_head_is_ignored() -> None:
    """Scores come from orig * mask: a masked head with large orig values stays pruned."""
    sd, arch = hand_built([[1, 9, 2, 3]])
    mask = torch.ones(3 * WIDTH, WIDTH)
    for part in range(3):
        mask[part * WIDTH + 2 : part * WIDTH + 4] = 0  # head 1
    effective = effective_state_dict({**{k: v for k, v in sd.items() if k != "blocks.0.attn.qkv.weight"},
                                      "blocks.0.attn.qkv.weight_orig": sd["blocks.0.attn.qkv.weight"],
                                      "blocks.0.attn.qkv.weight_mask": mask})
    result = run(effective, arch, {"blocks.0.attn.qkv.weight": mask}, target="head", head_ratio=0.5)
    assert result.kept_heads == [[2, 3]]


# --- golden: structured masks ---------------------------------------------------------


def test_structured_masks_cover_both_sides() -> None:
    sd, arch = hand_built([[4, 1, 3, 2]], neuron_in=[[6, 5, 4, 3, 2, 1]])
    result = run(sd, arch, head_ratio=0.5, mlp_ratio=0.5)
    qkv = result.masks["blocks.0.attn.qkv.weight"]
    proj = result.masks["blocks.0.attn.proj.weight"]
    expected_rows = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0] * 3, dtype=torch.float32)
    assert torch.equal(qkv, expected_rows[:, None].expand(24, 8))
    assert torch.equal(proj, expected_rows[:8][None, :].expand(8, 8))
    assert torch.equal(result.masks["blocks.0.mlp.fc1.weight"][:, 0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    assert torch.equal(result.masks["blocks.0.mlp.fc2.weight"][0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    assert qkv.dtype == torch.float32


def test_kept_head_mask_is_refilled() -> None:
    """A kept head gets ones on every qkv row entry, also where the old mask was 0."""
    sd, arch = hand_built([[4, 1, 3, 2]])
    mask = torch.ones(3 * WIDTH, WIDTH)
    mask[0, :4] = 0  # part of head 0
    weights = {**sd, "blocks.0.attn.qkv.weight": sd["blocks.0.attn.qkv.weight"] * mask}
    result = run(weights, arch, {"blocks.0.attn.qkv.weight": mask}, target="head", head_ratio=0.5)
    assert result.kept_heads == [[0, 2]]
    assert bool((result.masks["blocks.0.attn.qkv.weight"][0] == 1).all())


def test_untargeted_layers_keep_current_mask() -> None:
    sd, arch = hand_built([[4, 1, 3, 2]])
    fc1_mask = (torch.arange(NEURONS * WIDTH).reshape(NEURONS, WIDTH) % 3 != 0).float()
    weights = {**sd, "blocks.0.mlp.fc1.weight": sd["blocks.0.mlp.fc1.weight"] * fc1_mask}
    result = run(weights, arch, {"blocks.0.mlp.fc1.weight": fc1_mask}, target="head", head_ratio=0.5)
    assert torch.equal(result.masks["blocks.0.mlp.fc1.weight"], fc1_mask)
    assert bool((result.masks["blocks.0.mlp.fc2.weight"] == 1).all())
    assert result.neuron_budget == [None]


def test_mask_bias_masks_pruned_units() -> None:
    sd, arch = hand_built([[4, 1, 3, 2]], neuron_in=[[6, 5, 4, 3, 2, 1]])
    result = run(sd, arch, head_ratio=0.5, mlp_ratio=0.5, mask_bias=True)
    qkv_bias = result.masks["blocks.0.attn.qkv.bias"]
    assert torch.equal(qkv_bias, torch.tensor([1.0, 1, 0, 0, 1, 1, 0, 0] * 3))
    assert torch.equal(result.masks["blocks.0.mlp.fc1.bias"], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    assert "blocks.0.attn.proj.bias" not in result.masks


def test_biases_unmasked_by_default() -> None:
    sd, arch = hand_built([[4, 1, 3, 2]])
    result = run(sd, arch, head_ratio=0.5, mlp_ratio=0.5)
    assert sorted(result.masks) == sorted(prunable_weight_names(arch))


# --- golden: refill budget ------------------------------------------------------------

# qkv: heads 0 and 1 are strong (5, 4) and heads 2 and 3 weak (0.1). fc1:
# neurons 0-2 are strong (6) and 3-5 weak (0.2). proj and fc2 are all 3. Of the
# 352 entries, the 96 + 24 weak ones are the smallest, and
# round(0.341 * 352) = 120 removes exactly them.
REFILL_HEADS = [[5, 4, 0.1, 0.1]]
REFILL_NEURONS = [[6, 6, 6, 0.2, 0.2, 0.2]]
REFILL_OUT = [[3, 3, 3, 3]]
REFILL_NEURON_OUT = [[3, 3, 3, 3, 3, 3]]


def refill_case() -> tuple[dict[str, torch.Tensor], VitArchitecture]:
    return hand_built(REFILL_HEADS, REFILL_OUT, REFILL_NEURONS, REFILL_NEURON_OUT)


def test_refill_mask_removes_weak_entries() -> None:
    sd, arch = refill_case()
    result = run(sd, arch, refill=True, rate=0.341)
    assert result.refill_masks is not None
    qkv_m = result.refill_masks["blocks.0.attn.qkv.weight"]
    assert int(qkv_m.sum()) == 96
    assert int(result.refill_masks["blocks.0.mlp.fc1.weight"].sum()) == 24
    assert int(result.refill_masks["blocks.0.attn.proj.weight"].sum()) == 64


def test_refill_keeps_paid_units() -> None:
    """M's surviving entries fill 96 / 48 = 2 heads and 24 / 8 = 3 neurons."""
    sd, arch = refill_case()
    result = run(sd, arch, refill=True, rate=0.341)
    assert result.kept_heads == [[0, 1]]
    assert result.kept_neurons == [[0, 1, 2]]
    assert result.head_budget == [2]
    assert result.neuron_budget == [3]


def test_refill_plus_keeps_more() -> None:
    """floor(2 + 2 * 0.5) = 3 heads and floor(3 + 3 * 0.5) = 4 neurons; ties keep the lower index."""
    sd, arch = refill_case()
    result = run(sd, arch, refill=True, rate=0.341, refill_rate=0.5)
    assert result.kept_heads == [[0, 1, 2]]
    assert result.kept_neurons == [[0, 1, 2, 3]]


def test_refill_remain_criterion() -> None:
    sd, arch = refill_case()
    result = run(sd, arch, refill=True, rate=0.341, criterion="remain")
    assert result.kept_heads == [[0, 1]]


def test_refill_untargeted_layers_get_m() -> None:
    sd, arch = refill_case()
    result = run(sd, arch, refill=True, rate=0.341, target="head")
    assert result.refill_masks is not None
    assert torch.equal(result.masks["blocks.0.mlp.fc1.weight"], result.refill_masks["blocks.0.mlp.fc1.weight"])
    # M zeroes the fc1 rows of neurons 3-5 but not their fc2 columns, so none is pruned on both sides.
    assert result.kept_neurons == [[0, 1, 2, 3, 4, 5]]
    assert result.neuron_budget == [None]


def test_refill_global_pools_budget() -> None:
    sd, arch = hand_built(REFILL_HEADS * 2, REFILL_OUT * 2, REFILL_NEURONS * 2, REFILL_NEURON_OUT * 2)
    result = run(sd, arch, refill=True, rate=0.341, sorting="global", normalize_scores=False)
    assert result.kept_heads == [[0, 1], [0, 1]]
    assert result.kept_neurons == [[0, 1, 2], [0, 1, 2]]


# --- global magnitude mask --------------------------------------------------------------


def tiny_model(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=8, patch_size=4, embed_dim=WIDTH, depth=2, num_heads=HEADS,
                             mlp_ratio=NEURONS / WIDTH, num_classes=3)


def layers_of(model: VisionTransformer) -> list[tuple[torch.nn.Module, str]]:
    return [(m, "weight") for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2)]


def test_global_mask_matches_torch() -> None:
    """On random weights (no ties), the mask equals torch's global_unstructured L1, twice in a row."""
    model = tiny_model()
    arch = infer_architecture(model.state_dict(), heads=HEADS)
    names = prunable_weight_names(arch)
    prune.global_unstructured(layers_of(model), pruning_method=prune.L1Unstructured, amount=0.3)
    sd = model.state_dict()
    ours = global_magnitude_mask(effective_state_dict(sd), masks_of(sd), names, 0.3)
    prune.global_unstructured(layers_of(model), pruning_method=prune.L1Unstructured, amount=0.3)
    expected = masks_of(model.state_dict())
    for name in names:
        assert torch.equal(ours[name], expected[name]), name


def test_global_mask_keeps_pruned_entries_pruned() -> None:
    model = tiny_model()
    prune.global_unstructured(layers_of(model), pruning_method=prune.L1Unstructured, amount=0.5)
    sd = model.state_dict()
    masks = masks_of(sd)
    names = sorted(masks)
    new = global_magnitude_mask(effective_state_dict(sd), masks, names, 0.5)
    surviving = sum(int(masks[n].sum()) for n in names)
    assert all(bool((new[n] <= masks[n]).all()) for n in names)
    assert sum(int(new[n].sum()) for n in names) == surviving - round(0.5 * surviving)


def test_global_mask_ties_keep_lower_index() -> None:
    weights = {"a": torch.ones(2, 3), "b": torch.ones(2, 3)}
    new = global_magnitude_mask(weights, {}, ["a", "b"], 0.2)  # round(0.2 * 12) = 2 entries
    assert torch.equal(new["a"], torch.ones(2, 3))
    assert torch.equal(new["b"], torch.tensor([[1.0, 1, 1], [1, 0, 0]]))


# --- reparametrized output ---------------------------------------------------------------


def test_reparametrized_matches_torch_state_dict() -> None:
    model = tiny_model()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    arch = infer_architecture(dense, heads=HEADS)
    result = prune_units(dense, {}, arch, PruneConfig(head_ratio=0.5, mlp_ratio=0.5, mask_bias=True))
    for name, mask in result.masks.items():
        module_name, tensor_name = name.rsplit(".", 1)
        prune.custom_from_mask(model.get_submodule(module_name), tensor_name, mask)
    expected = model.state_dict()
    ours = to_reparametrized(dense, result.masks)
    assert list(ours) == list(expected)
    assert all(torch.equal(ours[k], expected[k]) for k in expected)


# --- properties -----------------------------------------------------------------------------

ratios = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])


def random_pruned(seed: int, amount: float) -> tuple[dict[str, torch.Tensor], VitArchitecture]:
    model = tiny_model(seed)
    if amount > 0:
        prune.global_unstructured(layers_of(model), pruning_method=prune.L1Unstructured, amount=amount)
    sd = model.state_dict()
    return sd, infer_architecture(sd, heads=HEADS)


def head_sides_uniform(result: PruneResult, arch: VitArchitecture) -> bool:
    for b in range(arch.depth):
        qkv = result.masks[f"blocks.{b}.attn.qkv.weight"].reshape(3, HEADS, HEAD_DIM, WIDTH)
        proj = result.masks[f"blocks.{b}.attn.proj.weight"].reshape(WIDTH, HEADS, HEAD_DIM)
        for h in range(HEADS):
            value = 1.0 if h in result.kept_heads[b] else 0.0
            if not (bool((qkv[:, h] == value).all()) and bool((proj[:, h] == value).all())):
                return False
        fc1, fc2 = result.masks[f"blocks.{b}.mlp.fc1.weight"], result.masks[f"blocks.{b}.mlp.fc2.weight"]
        for n in range(NEURONS):
            value = 1.0 if n in result.kept_neurons[b] else 0.0
            if not (bool((fc1[n] == value).all()) and bool((fc2[:, n] == value).all())):
                return False
    return True


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 50), amount=st.sampled_from([0.0, 0.3, 0.6]), head_ratio=ratios, mlp_ratio=ratios,
       criterion=st.sampled_from(["magnitude", "remain"]), sorting=st.sampled_from(["layer-wise", "global"]))
def test_normalized_twin_prunes_alike(
    seed: int, amount: float, head_ratio: float, mlp_ratio: float, criterion: str, sorting: str
) -> None:
    """A reparametrized checkpoint and its normalized twin (masks merged and dropped) get the same masks."""
    sd, arch = random_pruned(seed, amount)
    config = PruneConfig(criterion=criterion, sorting=sorting, head_ratio=head_ratio, mlp_ratio=mlp_ratio)
    effective = effective_state_dict(sd)
    with_masks = prune_units(effective, masks_of(sd), arch, config)
    twin = prune_units({k: v.clone() for k, v in effective.items()}, {}, arch, config)
    assert with_masks.kept_heads == twin.kept_heads
    assert with_masks.kept_neurons == twin.kept_neurons
    assert all(torch.equal(with_masks.masks[k], twin.masks[k]) for k in with_masks.masks)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 50), amount=st.sampled_from([0.0, 0.5]), head_ratio=ratios, mlp_ratio=ratios,
       refill=st.booleans(), sorting=st.sampled_from(["layer-wise", "global"]))
def test_units_fully_kept_or_pruned(
    seed: int, amount: float, head_ratio: float, mlp_ratio: float, refill: bool, sorting: str
) -> None:
    """Every head and neuron has all-one or all-zero masks on both sides, matching the kept lists."""
    sd, arch = random_pruned(seed, amount)
    config = PruneConfig(sorting=sorting, head_ratio=head_ratio, mlp_ratio=mlp_ratio, refill=refill, rate=0.4)
    result = prune_units(effective_state_dict(sd), masks_of(sd), arch, config)
    assert head_sides_uniform(result, arch)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 50), head_ratio=ratios, mlp_ratio=ratios, min_keep=st.integers(0, 2),
       sorting=st.sampled_from(["layer-wise", "global"]))
def test_kept_count_matches_budget(seed: int, head_ratio: float, mlp_ratio: float, min_keep: int, sorting: str) -> None:
    """Layer-wise: each layer keeps max(min_keep, floor(U * (1 - ratio))); global: the pooled count."""
    sd, arch = random_pruned(seed, 0.0)
    config = PruneConfig(sorting=sorting, head_ratio=head_ratio, mlp_ratio=mlp_ratio, min_keep=min_keep)
    result = prune_units(sd, {}, arch, config)
    for kept, units, ratio in ((result.kept_heads, HEADS, head_ratio), (result.kept_neurons, NEURONS, mlp_ratio)):
        per_layer = int(units * (1 - ratio) + 1e-9)
        if sorting == "layer-wise":
            assert [len(k) for k in kept] == [min(units, max(min_keep, per_layer))] * arch.depth
        else:
            total = int(units * arch.depth * (1 - ratio) + 1e-9)
            assert sum(len(k) for k in kept) == max(total, min(min_keep, units) * arch.depth)
            assert all(len(k) >= min(min_keep, units) for k in kept)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 50), masked=st.lists(st.integers(0, HEADS - 1), min_size=1, max_size=HEADS - 1,
                                                 unique=True),
       sorting=st.sampled_from(["layer-wise", "global"]))
def test_magnitude_never_picks_pruned_head(seed: int, masked: list[int], sorting: str) -> None:
    """With keep <= live heads, no masked head is kept, however large its weight_orig."""
    model = tiny_model(seed)
    mask = torch.ones(3 * WIDTH, WIDTH)
    with torch.no_grad():
        for h in masked:
            for part in range(3):
                rows = slice(part * WIDTH + h * HEAD_DIM, part * WIDTH + (h + 1) * HEAD_DIM)
                model.blocks[0].attn.qkv.weight[rows] = 100.0
                mask[rows] = 0
    prune.custom_from_mask(model.blocks[0].attn.qkv, "weight", mask)
    sd = model.state_dict()
    arch = infer_architecture(sd, heads=HEADS)
    live = HEADS - len(masked)
    ratio = 1 - live / HEADS
    result = prune_units(effective_state_dict(sd), masks_of(sd), arch,
                         PruneConfig(target="head", head_ratio=ratio, sorting=sorting))
    assert not set(result.kept_heads[0]) & set(masked)


def test_slimmed_blocks_prune_by_own_counts() -> None:
    """A physically slimmed block (2 heads, 3 neurons) keeps floor(U * 0.5) of its own units."""
    sd, arch = hand_built([[4, 1, 3, 2], [1, 3, 2, 4]])
    rows = [part * WIDTH + j for part in range(3) for j in range(2 * HEAD_DIM, 4 * HEAD_DIM)]
    sd["blocks.1.attn.qkv.weight"] = sd["blocks.1.attn.qkv.weight"][rows]
    sd["blocks.1.attn.qkv.bias"] = sd["blocks.1.attn.qkv.bias"][rows]
    sd["blocks.1.attn.proj.weight"] = sd["blocks.1.attn.proj.weight"][:, 2 * HEAD_DIM :]
    sd["blocks.1.mlp.fc1.weight"] = sd["blocks.1.mlp.fc1.weight"][:4]
    sd["blocks.1.mlp.fc1.bias"] = sd["blocks.1.mlp.fc1.bias"][:4]
    sd["blocks.1.mlp.fc2.weight"] = sd["blocks.1.mlp.fc2.weight"][:, :4]
    slim = infer_architecture(sd, heads=HEADS)
    assert slim.heads_per_block == (4, 2)
    result = run(sd, slim, head_ratio=0.5, mlp_ratio=0.5)
    assert result.kept_heads == [[0, 2], [1]]
    assert [len(k) for k in result.kept_neurons] == [3, 2]
    assert result.masks["blocks.1.attn.qkv.weight"].shape == (3 * 2 * HEAD_DIM, WIDTH)
