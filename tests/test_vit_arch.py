"""Architecture inference from timm ViT state dicts, and building the model back."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune as prune
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.models.vision_transformer import VisionTransformer

from prunedoctor.errors import StructureError
from prunedoctor.loading import load_checkpoint
from prunedoctor.reparam import effective_state_dict
from prunedoctor.vit.arch import build_timm_model, infer_architecture, load_weights_strictly

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def tiny_vit(**overrides: object) -> VisionTransformer:
    torch.manual_seed(0)
    config: dict[str, object] = {"img_size": 16, "patch_size": 4, "embed_dim": 24, "depth": 2, "num_heads": 4,
                                 "mlp_ratio": 2.0, "num_classes": 10}
    config.update(overrides)
    return VisionTransformer(**config)


def test_sizes_of_tiny_vit() -> None:
    arch = infer_architecture(tiny_vit().state_dict(), heads=4)
    assert arch.depth == 2
    assert arch.embed_dim == 24
    assert arch.num_heads == 4
    assert arch.head_dim == 6
    assert arch.mlp_hidden == (48, 48)
    assert arch.heads_per_block == (4, 4)
    assert arch.patch_size == 4
    assert arch.in_chans == 3
    assert arch.img_size == 16
    assert arch.num_prefix_tokens == 1
    assert arch.has_class_token
    assert arch.num_classes == 10
    assert arch.heads_source == "--heads"
    assert not arch.is_slimmed


def test_reparametrized_keys_give_same_sizes() -> None:
    model = tiny_vit()
    prune.l1_unstructured(model.blocks[0].attn.qkv, "weight", amount=0.5)
    prune.l1_unstructured(model.blocks[1].mlp.fc1, "weight", amount=0.5)
    sd = model.state_dict()
    assert "blocks.0.attn.qkv.weight_orig" in sd
    arch = infer_architecture(sd, heads=4)
    assert arch.mlp_hidden == (48, 48)
    assert arch.heads_per_block == (4, 4)


def test_heads_from_timm_model_name() -> None:
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=1, num_heads=3, num_classes=10)
    arch = infer_architecture(model.state_dict(), model_name="vit_tiny_patch16_224")
    assert arch.num_heads == 3
    assert arch.heads_source == "model name vit_tiny_patch16_224"


def test_model_name_width_mismatch_rejected() -> None:
    with pytest.raises(StructureError, match="embedding width 384 but the checkpoint has 24"):
        infer_architecture(tiny_vit().state_dict(), model_name="vit_small_patch16_224")


def test_unknown_model_name_rejected() -> None:
    with pytest.raises(StructureError, match="unknown timm model name 'vit_nonexistent'"):
        infer_architecture(tiny_vit().state_dict(), model_name="vit_nonexistent")


def test_heads_from_saved_args() -> None:
    arch = infer_architecture(tiny_vit().state_dict(), args=vars(argparse.Namespace(num_heads=2, lr=0.1)))
    assert arch.num_heads == 2
    assert arch.heads_source == "checkpoint args (num_heads=2)"


def test_heads_from_model_name_in_args() -> None:
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=1, num_heads=3, num_classes=10)
    arch = infer_architecture(model.state_dict(), args={"model": "vit_tiny_patch16_224"})
    assert arch.num_heads == 3
    assert arch.heads_source == "checkpoint args (model=vit_tiny_patch16_224)"


def test_heads_inferred_from_zeroed_rows() -> None:
    loaded = load_checkpoint(FIXTURES / "vit_head_pruned.pt")
    arch = infer_architecture(loaded.state_dict)
    assert arch.num_heads == 4
    assert arch.heads_source == "inferred from zeroed qkv rows"


def test_adjacent_pruned_heads_prefer_usual_width() -> None:
    """Two adjacent pruned heads of width 64 fit width 128 too; the usual width 64 wins."""
    model = VisionTransformer(img_size=16, patch_size=16, embed_dim=768, depth=1, num_heads=12, num_classes=0)
    mask = torch.ones(3 * 768, 768)
    for part in range(3):
        mask[part * 768 + 128 : part * 768 + 256] = 0
    prune.custom_from_mask(model.blocks[0].attn.qkv, "weight", mask)
    arch = infer_architecture(model.state_dict())
    assert arch.num_heads == 12
    assert arch.heads_source == "inferred from zeroed qkv rows"


def test_unstructured_zero_rows_not_inferred() -> None:
    """Zero rows that differ between q, k and v are not head pruning."""
    model = tiny_vit()
    mask = torch.ones(72, 24)
    mask[0:6] = 0  # q rows of head 0 only
    prune.custom_from_mask(model.blocks[0].attn.qkv, "weight", mask)
    arch = infer_architecture(model.state_dict())
    assert arch.heads_assumed


def test_assumed_heads_for_usual_width() -> None:
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=1, num_heads=3, num_classes=10)
    arch = infer_architecture(model.state_dict())
    assert arch.num_heads == 3
    assert arch.heads_assumed
    assert "timm's ViTs of embedding width 192" in arch.heads_source


def test_assumed_heads_for_unusual_width() -> None:
    arch = infer_architecture(tiny_vit().state_dict())
    assert arch.num_heads == 1
    assert arch.heads_assumed
    assert "pass --heads or --model" in arch.heads_source


def test_heads_not_dividing_width_rejected() -> None:
    with pytest.raises(StructureError, match="head count 5 .* does not divide the embedding width 24"):
        infer_architecture(tiny_vit().state_dict(), heads=5)


def test_non_vit_state_dict_rejected() -> None:
    weights = {"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}
    with pytest.raises(StructureError, match="no 'blocks.N.' keys"):
        infer_architecture(weights)


def test_missing_block_tensor_listed() -> None:
    weights = dict(tiny_vit().state_dict())
    del weights["blocks.1.mlp.fc2.weight"]
    del weights["blocks.0.attn.proj.weight"]
    with pytest.raises(StructureError, match="missing blocks.0.attn.proj.weight, blocks.1.mlp.fc2.weight"):
        infer_architecture(weights)


def test_register_tokens_and_avg_pool() -> None:
    model = tiny_vit(reg_tokens=2, class_token=False, global_pool="avg", fc_norm=True)
    arch = infer_architecture(model.state_dict(), heads=4)
    assert arch.num_prefix_tokens == 2
    assert not arch.has_class_token
    assert arch.num_reg_tokens == 2
    assert arch.fc_norm
    rebuilt = build_timm_model(arch)
    load_weights_strictly(rebuilt, model.state_dict())


def test_no_embed_class_layout() -> None:
    model = tiny_vit(no_embed_class=True)
    arch = infer_architecture(model.state_dict(), heads=4)
    assert arch.no_embed_class
    assert arch.img_size == 16
    load_weights_strictly(build_timm_model(arch), model.state_dict())


def test_distilled_model_round_trip() -> None:
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=16, patch_size=4, embed_dim=24, depth=1, num_heads=4, num_classes=10)
    arch = infer_architecture(model.state_dict(), heads=4)
    assert arch.has_dist_token
    assert arch.num_prefix_tokens == 2
    load_weights_strictly(build_timm_model(arch), model.state_dict())


def _slim(state_dict: dict[str, torch.Tensor], block: int, heads: list[int], neurons: list[int],
          head_dim: int, width: int) -> dict[str, torch.Tensor]:
    """Remove all heads and neurons of a block except the given ones (physical slimming)."""
    sd = dict(state_dict)
    rows = [p * width + h * head_dim + j for p in range(3) for h in heads for j in range(head_dim)]
    cols = [h * head_dim + j for h in heads for j in range(head_dim)]
    prefix = f"blocks.{block}."
    sd[prefix + "attn.qkv.weight"] = sd[prefix + "attn.qkv.weight"][rows]
    sd[prefix + "attn.qkv.bias"] = sd[prefix + "attn.qkv.bias"][rows]
    sd[prefix + "attn.proj.weight"] = sd[prefix + "attn.proj.weight"][:, cols]
    sd[prefix + "mlp.fc1.weight"] = sd[prefix + "mlp.fc1.weight"][neurons]
    sd[prefix + "mlp.fc1.bias"] = sd[prefix + "mlp.fc1.bias"][neurons]
    sd[prefix + "mlp.fc2.weight"] = sd[prefix + "mlp.fc2.weight"][:, neurons]
    return sd


def test_slimmed_blocks_differ() -> None:
    sd = _slim(tiny_vit().state_dict(), 0, [0, 3], list(range(32)), head_dim=6, width=24)
    arch = infer_architecture(sd, heads=4)
    assert arch.heads_per_block == (2, 4)
    assert arch.mlp_hidden == (32, 48)
    assert arch.is_slimmed


def test_slimmed_model_loads_and_runs() -> None:
    sd = _slim(tiny_vit().state_dict(), 1, [1], list(range(8)), head_dim=6, width=24)
    model = build_timm_model(infer_architecture(sd, heads=4))
    load_weights_strictly(model, sd)
    logits = model.eval()(torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 10)


def test_slimmed_width_not_multiple_rejected() -> None:
    sd = _slim(tiny_vit().state_dict(), 0, [0, 3], list(range(48)), head_dim=6, width=24)
    with pytest.raises(StructureError, match="does not divide the attention width of block 0: 12"):
        infer_architecture(sd, heads=3)


def test_strict_load_lists_all_problems() -> None:
    model = build_timm_model(infer_architecture(tiny_vit().state_dict(), heads=4))
    weights = dict(tiny_vit().state_dict())
    del weights["head.bias"]
    weights["extra.weight"] = torch.zeros(1)
    with pytest.raises(StructureError, match="missing head.bias; unexpected extra.weight"):
        load_weights_strictly(model, weights)


def test_built_model_matches_reparam_fixture() -> None:
    loaded = load_checkpoint(FIXTURES / "vit_state1.pt")
    arch = infer_architecture(loaded.state_dict, args=loaded.args)
    model = build_timm_model(arch)
    load_weights_strictly(model, effective_state_dict(loaded.state_dict))
    assert arch.heads_source == "checkpoint args (num_heads=4)"


@settings(max_examples=12, deadline=None)
@given(
    depth=st.integers(1, 3),
    heads=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([2, 4]),
    mlp_ratio=st.sampled_from([1.0, 2.0, 3.0]),
    patch=st.sampled_from([2, 4]),
    grid=st.integers(1, 4),
    classes=st.integers(0, 5),
)
def test_infer_then_build_round_trip(
    depth: int, heads: int, head_dim: int, mlp_ratio: float, patch: int, grid: int, classes: int
) -> None:
    """Inferring the architecture of a timm ViT and building it back gives the same state-dict shapes."""
    width = heads * head_dim
    model = VisionTransformer(img_size=grid * patch, patch_size=patch, embed_dim=width, depth=depth,
                              num_heads=heads, mlp_ratio=mlp_ratio, num_classes=classes)
    arch = infer_architecture(model.state_dict(), heads=heads)
    rebuilt = build_timm_model(arch).state_dict()
    original = model.state_dict()
    assert list(rebuilt) == list(original)
    assert all(rebuilt[k].shape == original[k].shape for k in original)


def test_assumed_single_head_singular() -> None:
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=4, num_classes=10)
    arch = infer_architecture(model.state_dict())
    assert arch.num_heads == 1
    assert "assumed: 1 head of width 64, the usual head width 64" in arch.heads_source
