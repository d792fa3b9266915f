"""The ViT structure in ``inspect`` (the ``vit`` section) and in ``check`` (PD020 to PD025)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from typer.testing import CliRunner

from prunedoctor.cli.app import app

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def invoke(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def check_json(*args: str | Path) -> tuple[int, dict[str, Any]]:
    result = invoke("check", *args, "--no-config", "--json")
    return result.exit_code, json.loads(result.stdout)


def finding_codes(report: dict[str, Any]) -> list[str]:
    return [f["code"] for f in report["files"][0]["findings"]]


def test_inspect_json_has_vit_section() -> None:
    result = invoke("inspect", FIXTURES / "vit_head_pruned.pt", "--json")
    assert result.exit_code == 0, result.output
    vit = json.loads(result.stdout)["vit"]
    assert vit["depth"] == 2
    assert vit["embed_dim"] == 24
    assert vit["heads"] == 4
    assert [b["heads"]["pruned"] for b in vit["blocks"]] == [[1], [0, 2]]
    assert vit["blocks"][0]["neurons"]["alive"] == 48


def test_inspect_heads_option() -> None:
    result = invoke("inspect", FIXTURES / "vit_mlp_pruned.pt", "--json", "--heads", "4")
    vit = json.loads(result.stdout)["vit"]
    assert vit["heads"] == 4
    assert vit["heads_source"] == "--heads"


def test_inspect_assumed_heads_warns() -> None:
    report = json.loads(invoke("inspect", FIXTURES / "vit_mlp_pruned.pt", "--json").stdout)
    assert report["vit"]["heads_assumed"]
    assert "PD025" in [f["code"] for f in report["findings"]]


def test_inspect_text_shows_map() -> None:
    result = invoke("inspect", FIXTURES / "vit_half_pruned.pt")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "ViT structure" in text
    assert "Heads and MLP neurons per block" in text
    assert "block 0 · ■ ◧ ■" in text
    assert "■ alive · pruned ◧ inconsistent" in text


def test_inspect_non_vit_has_no_section(tmp_path: Path) -> None:
    path = tmp_path / "cnn.pt"
    torch.save({"conv.weight": torch.ones(2, 3, 3, 3), "fc.weight": torch.ones(4, 2)}, path)
    report = json.loads(invoke("inspect", path, "--json").stdout)
    assert "vit" not in report


def test_inspect_unknown_model_rejected() -> None:
    result = invoke("inspect", FIXTURES / "vit_state1.pt", "--model", "vit_nonexistent")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "unknown timm model name 'vit_nonexistent'" in lines[0]


def test_inspect_heads_not_fitting_rejected() -> None:
    result = invoke("inspect", FIXTURES / "vit_state1.pt", "--heads", "5")
    assert result.exit_code == 2
    assert "head count 5 (from --heads) does not divide the embedding width 24" in result.stderr


def test_check_half_pruned_fails() -> None:
    code, report = check_json(FIXTURES / "vit_half_pruned.pt", "--ignore", "PD001")
    assert code == 1
    assert finding_codes(report) == ["PD020", "PD021", "PD020", "PD021"]


def test_check_min_heads() -> None:
    code, report = check_json(FIXTURES / "vit_head_pruned.pt", "--ignore", "PD001", "--min-heads", "3")
    assert code == 1
    assert finding_codes(report) == ["PD022"]
    code, _ = check_json(FIXTURES / "vit_head_pruned.pt", "--ignore", "PD001", "--min-heads", "2")
    assert code == 0


def test_check_against_revived_head() -> None:
    code, report = check_json(FIXTURES / "vit_state2_revived.pt", "--against", FIXTURES / "vit_state1.pt",
                              "--ignore", "PD001,PD013")
    assert code == 1
    assert finding_codes(report) == ["PD023"]
    assert report["files"][0]["findings"][0]["key"] == "blocks.0.attn"


def test_check_against_lower_sparsity() -> None:
    code, report = check_json(FIXTURES / "vit_state1.pt", "--against", FIXTURES / "vit_state2_revived.pt",
                              "--ignore", "PD001,PD013", "--select", "PD024")
    assert code == 1
    assert finding_codes(report) == ["PD024"]


def test_check_against_itself_passes() -> None:
    code, _ = check_json(FIXTURES / "vit_state1.pt", "--against", FIXTURES / "vit_state1.pt",
                         "--ignore", "PD001,PD013")
    assert code == 0


def test_check_against_missing_file(tmp_path: Path) -> None:
    result = invoke("check", FIXTURES / "vit_state1.pt", "--against", tmp_path / "missing.pt", "--no-config")
    assert result.exit_code == 2
    assert "missing.pt: file not found" in result.stderr


def test_check_against_non_vit(tmp_path: Path) -> None:
    path = tmp_path / "cnn.pt"
    torch.save({"conv.weight": torch.ones(2, 3, 3, 3)}, path)
    result = invoke("check", FIXTURES / "vit_state1.pt", "--against", path, "--no-config")
    assert result.exit_code == 2
    assert "--against compares timm ViT checkpoints" in result.stderr


def test_check_heads_not_fitting(tmp_path: Path) -> None:
    result = invoke("check", FIXTURES / "vit_state1.pt", "--heads", "5", "--no-config")
    assert result.exit_code == 2
    assert "head count 5 (from --heads) does not divide the embedding width 24" in result.stderr
