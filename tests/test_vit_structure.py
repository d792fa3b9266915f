"""Unit states, parameter and FLOP counts, and structure findings of ViT checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from prunedoctor.errors import StructureError
from prunedoctor.loading import load_checkpoint
from prunedoctor.reparam import effective_state_dict, masks_of
from prunedoctor.vit.arch import VitArchitecture, build_timm_model, infer_architecture
from prunedoctor.vit.structure import build_vit_report, compare_structure, count_flops, structure_findings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def fixture_report(name: str, **kwargs: Any) -> dict[str, Any]:
    loaded = load_checkpoint(FIXTURES / name)
    arch = infer_architecture(loaded.state_dict, args=loaded.args, **kwargs)
    return build_vit_report(effective_state_dict(loaded.state_dict), masks_of(loaded.state_dict), arch)


def codes(findings: list[Any]) -> list[str]:
    return [f.code for f in findings]


def test_head_pruned_fixture_heads() -> None:
    report = fixture_report("vit_head_pruned.pt")
    assert report["blocks"][0]["heads"]["pruned"] == [1]
    assert report["blocks"][0]["heads"]["alive"] == [0, 2, 3]
    assert report["blocks"][1]["heads"]["pruned"] == [0, 2]
    assert report["blocks"][1]["heads"]["inconsistent"] == []


def test_mlp_pruned_fixture_neurons() -> None:
    report = fixture_report("vit_mlp_pruned.pt", heads=4)
    block0, block1 = report["blocks"][0]["neurons"], report["blocks"][1]["neurons"]
    assert block0["pruned_indices"] == list(range(0, 48, 4))
    assert block0["alive"] == 36
    assert block1["pruned"] == 24
    assert block1["pruned_indices"] == list(range(1, 48, 2))


def test_half_pruned_fixture_inconsistent() -> None:
    report = fixture_report("vit_half_pruned.pt")
    block0, block1 = report["blocks"]
    assert block0["heads"]["pruned"] == [0]
    assert block0["heads"]["inconsistent"] == [2]
    assert block0["heads"]["inconsistent_zero_side"] == ["input"]
    assert block1["heads"]["inconsistent"] == [3]
    assert block1["heads"]["inconsistent_zero_side"] == ["output"]
    assert block1["neurons"]["inconsistent_indices"] == [5, 6, 7]
    assert block1["neurons"]["inconsistent_input_zero"] == 3
    assert block0["neurons"]["inconsistent_indices"] == [10]
    assert block0["neurons"]["inconsistent_input_zero"] == 0


def test_half_pruned_findings() -> None:
    findings = structure_findings(fixture_report("vit_half_pruned.pt"))
    assert codes(findings) == ["PD020", "PD021", "PD020", "PD021"]
    assert "block 0 head 2: its qkv rows are all zero but its proj columns are not" in findings[0].message
    assert "block 1: 3 MLP neurons" in findings[3].message
    assert all(f.severity == "error" for f in findings)


def test_consistent_fixture_has_no_findings() -> None:
    assert structure_findings(fixture_report("vit_head_pruned.pt")) == []


def test_min_heads_rule() -> None:
    findings = structure_findings(fixture_report("vit_head_pruned.pt"), min_heads=3)
    assert codes(findings) == ["PD022"]
    assert findings[0].key == "blocks.1.attn"
    assert "keeps 2 alive heads of 4, fewer than the minimum 3" in findings[0].message


def test_assumed_heads_warning() -> None:
    findings = structure_findings(fixture_report("vit_mlp_pruned.pt"))
    assert codes(findings) == ["PD025"]
    assert findings[0].severity == "warning"


def test_revived_head_between_states() -> None:
    findings = compare_structure(fixture_report("vit_state1.pt"), fixture_report("vit_state2_revived.pt"))
    assert codes(findings) == ["PD023"]
    assert findings[0].key == "blocks.0.attn"
    assert "head 1 was pruned in the previous checkpoint and is not pruned" in findings[0].message


def test_reversed_states_decrease_sparsity() -> None:
    findings = compare_structure(fixture_report("vit_state2_revived.pt"), fixture_report("vit_state1.pt"))
    assert "PD024" in codes(findings)
    revived = [f for f in findings if f.code == "PD023"]
    assert [f.key for f in revived] == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]


def test_compare_different_depth_rejected() -> None:
    report = fixture_report("vit_state1.pt")
    shorter = dict(report, depth=1, blocks=report["blocks"][:1])
    with pytest.raises(StructureError, match="previous checkpoint has 2 blocks, this one 1"):
        compare_structure(report, shorter)


def test_sidecar_mask_counts_as_applied() -> None:
    """A plain weight with a mask saved beside it is judged by the mask."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=1, num_heads=4, mlp_ratio=2.0,
                              num_classes=10)
    weights = dict(model.state_dict())
    mask = torch.ones(48, 24)
    mask[7] = 0
    fc2_mask = torch.ones(24, 48)
    fc2_mask[:, 7] = 0
    masks = {"blocks.0.mlp.fc1.weight": mask, "blocks.0.mlp.fc2.weight": fc2_mask}
    report = build_vit_report(weights, masks, infer_architecture(weights, heads=4))
    assert report["blocks"][0]["neurons"]["pruned_indices"] == [7]


def test_flops_formula_by_hand() -> None:
    arch = infer_architecture(
        VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=4, num_classes=10).state_dict(),
        heads=4,
    )
    flops = count_flops(arch, [4, 2], [48, 10])
    tokens = 17
    patch_embed = 16 * 24 * 3 * 16
    block0 = tokens * 24 * 72 + 2 * 4 * tokens * tokens * 6 + tokens * 24 * 24 + 2 * tokens * 24 * 48
    block1 = tokens * 24 * 36 + 2 * 2 * tokens * tokens * 6 + tokens * 12 * 24 + 2 * tokens * 24 * 10
    assert flops["patch_embed"] == patch_embed
    assert flops["blocks"] == block0 + block1
    assert flops["head"] == 240
    assert flops["total"] == patch_embed + block0 + block1 + 240


def test_remaining_params_match_slimmed_model() -> None:
    """Parameters left after removing pruned units equal those of the physically slimmed timm model."""
    loaded = load_checkpoint(FIXTURES / "vit_state2_revived.pt")
    arch = infer_architecture(loaded.state_dict, args=loaded.args)
    report = build_vit_report(effective_state_dict(loaded.state_dict), masks_of(loaded.state_dict), arch)
    slim = VitArchitecture(**{
        **arch.__dict__,
        "heads_per_block": tuple(b["heads"]["total"] - len(b["heads"]["pruned"]) for b in report["blocks"]),
        "mlp_hidden": tuple(b["neurons"]["total"] - b["neurons"]["pruned"] for b in report["blocks"]),
    })
    model = build_timm_model(slim)
    assert report["params"]["remaining"] == sum(p.numel() for p in model.state_dict().values())


def test_dense_params_count_every_tensor() -> None:
    loaded = load_checkpoint(FIXTURES / "vit_head_pruned.pt")
    weights = effective_state_dict(loaded.state_dict)
    report = build_vit_report(weights, masks_of(loaded.state_dict), infer_architecture(weights))
    assert report["params"]["dense"] == sum(t.numel() for t in weights.values())


def test_sparsity_counts_prunable_zeros() -> None:
    report = fixture_report("vit_head_pruned.pt")
    # Block 0 loses 1 head of 4: 18 qkv rows of 24 entries and 6 proj columns of 24 entries.
    assert report["blocks"][0]["zeros"] == 18 * 24 + 24 * 6
    assert report["blocks"][0]["entries"] == 72 * 24 + 24 * 24 + 2 * 48 * 24


def test_report_is_json() -> None:
    report = fixture_report("vit_state1.pt")
    assert json.loads(json.dumps(report)) == report
