"""The inspect report: counts, sparsity, findings, JSON schema and the rendered command output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from prunedoctor.cli.app import app
from prunedoctor.cli.render import render_inspect
from prunedoctor.findings import Finding
from prunedoctor.inspection import (
    REPORT_SCHEMA,
    ReportSection,
    SectionResult,
    analyze_checkpoint,
    build_report,
    inspect_checkpoint,
)
from prunedoctor.loading import load_checkpoint

PAIRED = [
    f"blocks.{block}.{name}"
    for block in (0, 1)
    for name in ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")
]


def _codes(report: dict) -> set[str]:
    return {finding["code"] for finding in report["findings"]}


def test_report_has_schema_keys(fixtures_dir: Path) -> None:
    report = inspect_checkpoint(fixtures_dir / "vit_tiny_reparam.pt")
    required = {"format", "container", "prefixes", "tensors", "parameters", "reparametrized", "sparsity", "findings"}
    assert required <= set(report)
    assert report["schema"] == REPORT_SCHEMA
    assert "global" in report["sparsity"]


def test_report_is_strict_json(fixtures_dir: Path) -> None:
    report = inspect_checkpoint(fixtures_dir / "vit_tiny_train_container.pt", include_tensors=True)
    assert json.loads(json.dumps(report, allow_nan=False)) == report


def test_reparametrized_names_listed(fixtures_dir: Path) -> None:
    report = inspect_checkpoint(fixtures_dir / "vit_tiny_reparam.pt")
    assert sorted(report["reparametrized"]) == sorted(PAIRED)


def test_counts_of_reparam_fixture(fixtures_dir: Path) -> None:
    report = inspect_checkpoint(fixtures_dir / "vit_tiny_reparam.pt")
    reference = torch.load(fixtures_dir / "vit_tiny_normalized.pt", weights_only=True)
    assert report["tensors"] == len(reference) + len(PAIRED)
    assert report["parameter_tensors"] == len(reference)
    assert report["parameters"] == sum(tensor.numel() for tensor in reference.values())


def test_mask_bytes_sum_masks(fixtures_dir: Path) -> None:
    report = inspect_checkpoint(fixtures_dir / "vit_tiny_reparam.pt")
    state = torch.load(fixtures_dir / "vit_tiny_reparam.pt", weights_only=True)
    masks = [tensor for key, tensor in state.items() if key.endswith("_mask")]
    assert report["mask_bytes"] == sum(mask.numel() * mask.element_size() for mask in masks)


def test_global_sparsity_by_count_nonzero(fixtures_dir: Path) -> None:
    reference = torch.load(fixtures_dir / "vit_tiny_normalized.pt", weights_only=True)
    weights = [tensor for tensor in reference.values() if tensor.is_floating_point() and tensor.dim() >= 2]
    entries = sum(tensor.numel() for tensor in weights)
    zeros = entries - sum(int(torch.count_nonzero(tensor)) for tensor in weights)
    report = inspect_checkpoint(fixtures_dir / "vit_tiny_reparam.pt")
    assert report["sparsity"]["zeros"] == zeros
    assert report["sparsity"]["global"] == round(zeros / entries, 6)


def test_mask_sparsity_by_count_nonzero(fixtures_dir: Path) -> None:
    state = torch.load(fixtures_dir / "vit_tiny_reparam.pt", weights_only=True)
    masks = [tensor for key, tensor in state.items() if key.endswith("_mask")]
    entries = sum(mask.numel() for mask in masks)
    zeros = entries - sum(int(torch.count_nonzero(mask)) for mask in masks)
    report = inspect_checkpoint(fixtures_dir / "vit_tiny_reparam.pt")
    assert report["sparsity"]["masks"] == round(zeros / entries, 6)


def test_normalized_twin_same_sparsity(fixtures_dir: Path) -> None:
    pruned = inspect_checkpoint(fixtures_dir / "vit_tiny_reparam.pt")["sparsity"]
    twin = inspect_checkpoint(fixtures_dir / "vit_tiny_normalized.pt")["sparsity"]
    assert pruned["global"] == twin["global"]
    assert twin["masks"] is None


def test_layer_sparsity_of_pruned_head(fixtures_dir: Path) -> None:
    report = inspect_checkpoint(fixtures_dir / "vit_tiny_reparam.pt")
    layers = {layer["name"]: layer for layer in report["sparsity"]["layers"]}
    assert layers["blocks.0.attn.proj.weight"]["mask_sparsity"] == 0.25
    assert layers["blocks.0.mlp.fc1.weight"]["sparsity"] == 0.5


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("vit_tiny_reparam.pt", "PD001"),
        ("broken_orphan_mask.pt", "PD002"),
        ("broken_shape_mismatch.pt", "PD004"),
        ("broken_nonbinary_mask.pt", "PD005"),
        ("broken_nan.pt", "PD006"),
        ("vit_tiny_sidecar_revived.pt", "PD009"),
        ("vit_tiny_dp_compiled.pt", "PD012"),
        ("vit_tiny_train_container.pt", "PD013"),
    ],
)
def test_fixture_gives_finding(fixtures_dir: Path, name: str, code: str) -> None:
    assert code in _codes(inspect_checkpoint(fixtures_dir / name))


def test_normalized_fixture_clean(fixtures_dir: Path) -> None:
    assert inspect_checkpoint(fixtures_dir / "vit_tiny_normalized.pt")["findings"] == []


def test_unsafe_load_reports_globals(fixtures_dir: Path) -> None:
    report = inspect_checkpoint(fixtures_dir / "vit_tiny_unsafe_globals.pt", unsafe_load=True)
    unsafe = [finding for finding in report["findings"] if finding["code"] == "PD007"]
    assert len(unsafe) == 1
    assert unsafe[0]["severity"] == "warning"
    assert "datetime.datetime" in unsafe[0]["message"]


def test_orphan_orig_reported(tmp_path: Path) -> None:
    path = tmp_path / "orphan.pt"
    torch.save({"fc.weight_orig": torch.ones(2, 2), "fc.bias": torch.zeros(2)}, path)
    assert "PD003" in _codes(inspect_checkpoint(path))


def test_shared_storage_reported(tmp_path: Path) -> None:
    path = tmp_path / "tied.pt"
    weight = torch.randn(10, 4)
    torch.save({"embed.weight": weight, "head.weight": weight}, path)
    shared = [finding for finding in inspect_checkpoint(path)["findings"] if finding["code"] == "PD008"]
    assert [finding["key"] for finding in shared] == ["embed.weight"]


def test_fp16_and_bf16_dtypes(fixtures_dir: Path) -> None:
    assert inspect_checkpoint(fixtures_dir / "vit_tiny_fp16.pt")["dtypes"] == {"float16": 42}
    assert inspect_checkpoint(fixtures_dir / "vit_tiny_bf16.safetensors")["dtypes"] == {"bfloat16": 42}


def test_tensor_list_roles(fixtures_dir: Path) -> None:
    report = inspect_checkpoint(fixtures_dir / "vit_tiny_reparam.pt", include_tensors=True)
    roles = {item["key"]: item["role"] for item in report["tensor_list"]}
    assert roles["blocks.0.attn.qkv.weight_orig"] == "orig"
    assert roles["blocks.0.attn.qkv.weight_mask"] == "mask"
    assert roles["cls_token"] == "plain"


def test_extra_section_added(fixtures_dir: Path) -> None:
    checkpoint = load_checkpoint(fixtures_dir / "vit_tiny_normalized.pt")
    extra = Finding("PD025", "info", "<file>", "head count assumed")
    section = ReportSection("demo", lambda loaded, analysis: SectionResult({"count": len(analysis.stats)}, [extra]))
    report = build_report(checkpoint, sections=[section])
    assert report["demo"] == {"count": 32}
    assert report["findings"] == [extra.to_dict()]


def test_analysis_progress_reaches_total(fixtures_dir: Path) -> None:
    calls: list[tuple[int, int]] = []
    analyze_checkpoint(load_checkpoint(fixtures_dir / "vit_tiny_reparam.pt"), progress=lambda *call: calls.append(call))
    assert calls[-1] == (32, 32)


def test_render_shows_summary(fixtures_dir: Path) -> None:
    console = Console(width=120, record=True, color_system=None)
    render_inspect(inspect_checkpoint(fixtures_dir / "vit_tiny_dp_compiled.pt"), console)
    text = console.export_text()
    assert "stripped 'module.' '_orig_mod.'" in text
    assert "10 parameters stored as _orig/_mask pairs" in text
    assert "35.7 % global" in text
    assert "PD001" in text


def test_cli_inspect_text(runner: CliRunner, fixtures_dir: Path) -> None:
    result = runner.invoke(app, ["inspect", str(fixtures_dir / "vit_tiny_reparam.pt")])
    assert result.exit_code == 0
    assert "Layer sparsity" in result.stdout
    assert result.stderr == ""


def test_cli_inspect_json(runner: CliRunner, fixtures_dir: Path) -> None:
    result = runner.invoke(app, ["inspect", "--json", str(fixtures_dir / "vit_tiny_ema.pt"), "--select", "state_dict_ema"])
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["container"] == "state_dict_ema"


def test_cli_inspect_tensors(runner: CliRunner, fixtures_dir: Path) -> None:
    result = runner.invoke(app, ["inspect", "--tensors", str(fixtures_dir / "vit_tiny_reparam.pt")],
                           env={"COLUMNS": "160"})
    assert result.exit_code == 0
    assert "Stored tensors" in result.stdout
    assert "blocks.1.mlp.fc2.weight_mask" in result.stdout


def test_cli_inspect_unsafe_refused(runner: CliRunner, fixtures_dir: Path) -> None:
    result = runner.invoke(app, ["inspect", str(fixtures_dir / "vit_tiny_unsafe_globals.pt")])
    assert result.exit_code == 2
    assert "datetime.datetime" in result.stderr
    assert result.stdout == ""
