"""``prunedoctor diff``: the library comparison and the command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from typer.testing import CliRunner

from prunedoctor.cli.app import app
from prunedoctor.cli.render_vit import render_diff_report
from prunedoctor.diff import compare_masks, compare_tensors, diff_state_dicts
from prunedoctor.loading import load_checkpoint
from prunedoctor.reparam import effective_state_dict

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def fixture_sd(name: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(FIXTURES / name).state_dict


def invoke(*args: str | Path) -> Any:
    return CliRunner().invoke(app, ["diff", *map(str, args)])


def save_normalized_twin(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"normalized_{name}"
    torch.save(effective_state_dict(fixture_sd(name)), path)
    return path


# --- library -----------------------------------------------------------------------------


def test_tensor_metrics_by_hand() -> None:
    values = compare_tensors(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0]))
    assert values["max_abs"] == 4.0
    assert values["rel_l2"] == 4.0 / 5.0
    assert values["changed"] == 1
    assert not values["within_tolerance"]


def test_tolerance_is_relative_to_b() -> None:
    a, b = torch.tensor([1.0, 100.0]), torch.tensor([1.0, 101.0])
    assert compare_tensors(a, b, rtol=0.01)["within_tolerance"]
    assert not compare_tensors(a, b, rtol=0.009)["within_tolerance"]
    assert compare_tensors(a, b, atol=1.0)["within_tolerance"]


def test_nan_equals_nan() -> None:
    a = torch.tensor([float("nan"), 1.0])
    assert compare_tensors(a, a.clone())["changed"] == 0


def test_same_checkpoint_equal() -> None:
    sd = fixture_sd("vit_state1.pt")
    report = diff_state_dicts(sd, sd)
    assert report["equal"]
    assert report["tensors"] == []
    assert report["masks"] == []


def test_reparam_equals_normalized_twin() -> None:
    sd = fixture_sd("vit_head_pruned.pt")
    report = diff_state_dicts(sd, effective_state_dict(sd))
    assert report["equal"]
    assert report["structure"]["blocks"][0] == {"index": 0, "heads_pruned": [], "heads_revived": [],
                                                "neurons_pruned": [], "neurons_revived": []}


def test_raw_view_sees_reparam_keys() -> None:
    sd = fixture_sd("vit_head_pruned.pt")
    report = diff_state_dicts(sd, effective_state_dict(sd), raw=True)
    assert not report["equal"]
    assert "blocks.0.attn.qkv.weight_orig" in report["only_in_a"]
    assert "blocks.0.attn.qkv.weight_mask" in report["only_in_a"]
    assert "blocks.0.attn.qkv.weight" in report["only_in_b"]


def test_revived_head_between_states() -> None:
    report = diff_state_dicts(fixture_sd("vit_state1.pt"), fixture_sd("vit_state2_revived.pt"), heads=4)
    blocks = report["structure"]["blocks"]
    assert blocks[0]["heads_revived"] == [1]
    assert blocks[0]["heads_pruned"] == [2]
    assert blocks[1]["heads_pruned"] == [0]
    assert blocks[1]["heads_revived"] == []
    assert blocks[0]["neurons_pruned"] == [6, 7, 8, 9]
    assert blocks[1]["neurons_pruned"] == [0, 1, 2, 3, 36, 37, 38, 39]
    assert report["sparsity"]["change"] > 0


def test_mask_entry_counts_by_hand() -> None:
    mask_a = torch.tensor([[1.0, 1, 0, 0]])
    mask_b = torch.tensor([[1.0, 0, 0, 1]])
    a = {"layer.weight_orig": torch.ones(1, 4), "layer.weight_mask": mask_a}
    b = {"layer.weight_orig": torch.ones(1, 4), "layer.weight_mask": mask_b}
    assert compare_masks(a, b) == [{"param": "layer.weight", "entries": 4, "newly_pruned": 1, "revived": 1}]


def test_mask_against_plain_weight_zeros() -> None:
    """A mask on one side is compared with the zeros of the other side's plain weight."""
    a = {"layer.weight_orig": torch.ones(1, 4), "layer.weight_mask": torch.tensor([[1.0, 1, 0, 0]])}
    b = {"layer.weight": torch.tensor([[1.0, 0, 0, 0]])}
    assert compare_masks(a, b) == [{"param": "layer.weight", "entries": 4, "newly_pruned": 1, "revived": 0}]


def test_kept_zero_not_newly_pruned() -> None:
    """A weight that is 0 under a mask of 1 is not newly pruned against a side without masks."""
    a = {"layer.bias_orig": torch.tensor([0.0, 2.0]), "layer.bias_mask": torch.ones(2)}
    b = {"layer.bias": torch.tensor([0.0, 2.0])}
    assert compare_masks(a, b) == []


def test_kept_zero_not_revived() -> None:
    """A zero in A without a mask is not revived by a mask of 1 in B while B's value stays 0."""
    a = {"layer.bias": torch.tensor([0.0, 0.0])}
    b = {"layer.bias_orig": torch.tensor([0.0, 2.0]), "layer.bias_mask": torch.ones(2)}
    assert compare_masks(a, b) == [{"param": "layer.bias", "entries": 2, "newly_pruned": 0, "revived": 1}]


def test_plain_zeros_count_without_masks() -> None:
    a = {"layer.weight": torch.tensor([[1.0, 2.0, 0.0, 4.0]])}
    b = {"layer.weight": torch.tensor([[0.0, 0.0, 3.0, 4.0]])}
    assert compare_masks(a, b) == [{"param": "layer.weight", "entries": 4, "newly_pruned": 2, "revived": 1}]


def test_reparam_fixture_equals_normalized_fixture() -> None:
    report = diff_state_dicts(fixture_sd("vit_tiny_reparam.pt"), fixture_sd("vit_tiny_normalized.pt"))
    assert report["masks"] == []
    assert report["equal"]


def test_plain_states_count_new_zeros() -> None:
    a = fixture_sd("states/state_0/model.pt")
    b = fixture_sd("states/state_1/model.pt")
    masks = compare_masks(a, b)
    assert sum(m["newly_pruned"] for m in masks) == 18_048
    assert sum(m["revived"] for m in masks) == 0


def test_shape_and_dtype_changes() -> None:
    a = {"x": torch.zeros(2, 3), "y": torch.zeros(4)}
    b = {"x": torch.zeros(3, 2), "y": torch.zeros(4, dtype=torch.float16)}
    report = diff_state_dicts(a, b)
    assert report["shape_changes"] == [{"key": "x", "a": [2, 3], "b": [3, 2]}]
    assert report["dtype_changes"] == [{"key": "y", "a": "float32", "b": "float16"}]
    assert not report["equal"]


def test_non_vit_has_no_structure() -> None:
    a = {"fc.weight": torch.ones(2, 2)}
    report = diff_state_dicts(a, {"fc.weight": torch.tensor([[1.0, 0], [1, 1]])})
    assert report["structure"] is None
    assert "no 'blocks.N.' keys" in report["structure_note"]
    assert report["sparsity"]["b"] == 0.25
    assert report["sparsity"]["scope"] == "all floating-point tensors with 2 or more dimensions"


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), scale=st.floats(1e-6, 1e-2))
def test_noise_within_matching_tolerance(seed: int, scale: float) -> None:
    """Noise of at most ``scale`` is equal at atol = scale and different at atol 0.

    rtol 1e-6 allows for the float32 rounding of ``v + noise``.
    """
    sd = effective_state_dict(fixture_sd("vit_state1.pt"))
    generator = torch.Generator().manual_seed(seed)
    noisy = {k: v + scale * (2 * torch.rand(v.shape, generator=generator) - 1) * (v != 0) for k, v in sd.items()}
    assert diff_state_dicts(sd, noisy, atol=scale, rtol=1e-6)["equal"]
    assert not diff_state_dicts(sd, noisy)["equal"]


def test_diff_report_renders(tmp_path: Path) -> None:
    report = diff_state_dicts(fixture_sd("vit_state1.pt"), fixture_sd("vit_state2_revived.pt"))
    console = Console(width=120, record=True, force_terminal=False)
    render_diff_report(console, {"a": "state1.pt", "b": "state2.pt", **report})
    text = " ".join(console.export_text().split())
    assert "Heads and neurons that changed state" in text
    assert "revived: both sides zero in A but not in B" in text
    assert "rel. L2: ||A-B|| / max(||A||, ||B||)" in text
    assert "different (exit 1)" in text


# --- command -------------------------------------------------------------------------------


def test_command_equal_exits_zero(tmp_path: Path) -> None:
    twin = save_normalized_twin(tmp_path, "vit_state1.pt")
    result = invoke(FIXTURES / "vit_state1.pt", twin)
    assert result.exit_code == 0, result.output
    assert "equal within tolerance (exit 0)" in result.stdout


def test_command_reparam_twin_fixtures_exit_zero() -> None:
    result = invoke(FIXTURES / "vit_tiny_reparam.pt", FIXTURES / "vit_tiny_normalized.pt")
    assert result.exit_code == 0, result.output
    assert "mask entries  no change" in result.stdout


def test_command_plain_states_exit_one() -> None:
    result = invoke(FIXTURES / "states" / "state_0" / "model.pt", FIXTURES / "states" / "state_1" / "model.pt")
    assert result.exit_code == 1
    assert "18,048 newly pruned" in result.stdout


def test_command_raw_exits_one(tmp_path: Path) -> None:
    twin = save_normalized_twin(tmp_path, "vit_state1.pt")
    result = invoke(FIXTURES / "vit_state1.pt", twin, "--raw", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["view"] == "raw"


def test_command_json_report() -> None:
    result = invoke(FIXTURES / "vit_state1.pt", FIXTURES / "vit_state2_revived.pt", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["a"].endswith("vit_state1.pt")
    assert report["structure"]["blocks"][0]["heads_revived"] == [1]
    assert report["structure"]["heads_source"] == "checkpoint args (num_heads=4)"


def test_command_quiet_uses_exit_code() -> None:
    result = invoke(FIXTURES / "vit_state1.pt", FIXTURES / "vit_state2_revived.pt", "--quiet")
    assert result.exit_code == 1
    assert result.stdout == ""


def test_command_missing_file(tmp_path: Path) -> None:
    result = invoke(FIXTURES / "vit_state1.pt", tmp_path / "missing.pt")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"prunedoctor: error: {tmp_path / 'missing.pt'}: file not found"]


def test_command_negative_tolerance(tmp_path: Path) -> None:
    result = invoke(FIXTURES / "vit_state1.pt", FIXTURES / "vit_state1.pt", "--atol", "-1")
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_command_singular_tensor(tmp_path: Path) -> None:
    torch.save({"w": torch.randn(4, 4)}, tmp_path / "one.pt")
    result = invoke(tmp_path / "one.pt", tmp_path / "one.pt")
    assert result.exit_code == 0
    assert "1 tensor identical" in result.stdout


def test_command_sparsity_scope_grammar(tmp_path: Path) -> None:
    torch.save({"w": torch.randn(4, 4)}, tmp_path / "one.pt")
    result = invoke(tmp_path / "one.pt", tmp_path / "one.pt")
    text = " ".join(result.stdout.split())
    assert "sparsity of all floating-point tensors" in text
