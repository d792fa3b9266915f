"""check: rules by code, sparsity range, pyproject configuration, text/json/github output, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from prunedoctor.checks import CheckOptions, check_checkpoints, resolve_options
from prunedoctor.cli.app import app
from prunedoctor.config import ProjectConfig, find_config, load_config
from prunedoctor.errors import PrunedoctorError

GLOBAL_SPARSITY = 0.357077  # of vit_tiny_reparam.pt and its normalized twin


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from an empty directory, so the repository's own pyproject.toml never applies."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)


def _check(runner: CliRunner, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["check", *args], env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


def test_normalized_passes(runner: CliRunner, fixtures_dir: Path) -> None:
    code, out, _ = _check(runner, str(fixtures_dir / "vit_tiny_normalized.pt"))
    assert code == 0
    assert "PASS" in out


def test_reparametrized_fails(runner: CliRunner, fixtures_dir: Path) -> None:
    code, out, _ = _check(runner, str(fixtures_dir / "vit_tiny_reparam.pt"))
    assert code == 1
    assert "PD001" in out


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("broken_orphan_mask.pt", "PD002"),
        ("broken_shape_mismatch.pt", "PD004"),
        ("broken_nonbinary_mask.pt", "PD005"),
        ("broken_nan.pt", "PD006"),
        ("vit_tiny_sidecar_revived.pt", "PD009"),
    ],
)
def test_broken_fixture_fails_rule(fixtures_dir: Path, name: str, code: str) -> None:
    result = check_checkpoints([fixtures_dir / name], CheckOptions(ignore=("PD001",)))
    assert [finding.code for finding in result.files[0].failures] == [code]


def test_ignore_skips_code(runner: CliRunner, fixtures_dir: Path) -> None:
    code, _, _ = _check(runner, "--ignore", "PD001", str(fixtures_dir / "vit_tiny_reparam.pt"))
    assert code == 0


def test_select_keeps_only_codes(fixtures_dir: Path) -> None:
    result = check_checkpoints([fixtures_dir / "broken_nan.pt"], CheckOptions(select=("PD006",)))
    assert {finding.code for finding in result.files[0].findings} == {"PD006"}


def test_min_sparsity_violation(runner: CliRunner, fixtures_dir: Path) -> None:
    code, out, _ = _check(runner, "--min-sparsity", "0.4", str(fixtures_dir / "vit_tiny_normalized.pt"))
    assert code == 1
    assert "PD010" in out


def test_max_sparsity_violation(fixtures_dir: Path) -> None:
    result = check_checkpoints([fixtures_dir / "vit_tiny_normalized.pt"], CheckOptions(max_sparsity=0.3))
    assert [finding.code for finding in result.files[0].failures] == ["PD010"]


def test_sparsity_inside_range(fixtures_dir: Path) -> None:
    options = CheckOptions(min_sparsity=GLOBAL_SPARSITY - 0.001, max_sparsity=GLOBAL_SPARSITY + 0.001)
    assert check_checkpoints([fixtures_dir / "vit_tiny_normalized.pt"], options).passed


def test_fail_on_warning(tmp_path: Path) -> None:
    path = tmp_path / "tied.pt"
    weight = torch.randn(4, 4)
    torch.save({"a.weight": weight, "b.weight": weight}, path)
    assert check_checkpoints([path], CheckOptions()).passed
    assert not check_checkpoints([path], CheckOptions(fail_on="warning")).passed


def test_several_files_one_call(runner: CliRunner, fixtures_dir: Path) -> None:
    code, out, _ = _check(runner, str(fixtures_dir / "vit_tiny_normalized.pt"), str(fixtures_dir / "broken_nan.pt"))
    assert code == 1
    assert "Checked 2 files: 1 passed, 1 failed" in out


def test_unreadable_file_exits_2(runner: CliRunner, fixtures_dir: Path) -> None:
    code, out, err = _check(runner, str(fixtures_dir / "broken_truncated.pt"), str(fixtures_dir / "vit_tiny_normalized.pt"))
    assert code == 2
    assert err.startswith("prunedoctor: error: ")
    assert "broken_truncated.pt" in err
    assert "PASS" in out


def test_json_output_schema(runner: CliRunner, fixtures_dir: Path) -> None:
    code, out, _ = _check(runner, "--json", str(fixtures_dir / "broken_nan.pt"))
    report = json.loads(out)
    assert code == 1
    assert report["schema"] == "prunedoctor.check/1"
    assert report["files"][0]["passed"] is False
    assert {"code", "severity", "key", "message"} <= set(report["files"][0]["findings"][0])


def test_github_annotations(runner: CliRunner, fixtures_dir: Path) -> None:
    code, out, _ = _check(runner, "--format", "github", "--select", "PD006", str(fixtures_dir / "broken_nan.pt"))
    lines = out.splitlines()
    assert code == 1
    assert lines[0].startswith("::error file=")
    assert "title=PD006 blocks.1.attn.proj.weight_orig::" in lines[0]
    assert lines[-1] == "prunedoctor check: 0 of 1 files passed"


def test_list_rules(runner: CliRunner) -> None:
    code, out, _ = _check(runner, "--list-rules")
    assert code == 0
    assert "PD010" in out


def test_unknown_code_exits_2(runner: CliRunner, fixtures_dir: Path) -> None:
    code, _, err = _check(runner, "--select", "PD999", str(fixtures_dir / "vit_tiny_normalized.pt"))
    assert code == 2
    assert "unknown finding code PD999" in err


def test_no_file_exits_2(runner: CliRunner) -> None:
    code, _, err = _check(runner)
    assert code == 2
    assert "no checkpoint given" in err


def _write_pyproject(folder: Path, table: str) -> Path:
    path = folder / "pyproject.toml"
    path.write_text(f"[project]\nname = 'demo'\n\n[tool.prunedoctor]\n{table}\n", encoding="utf-8")
    return path


def test_config_found_upward(tmp_path: Path) -> None:
    path = _write_pyproject(tmp_path, "min-sparsity = 0.5")
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    assert find_config(nested) == path


def test_config_values_parsed(tmp_path: Path) -> None:
    path = _write_pyproject(tmp_path, 'select = ["pd001", "PD005,PD006"]\nmax-sparsity = 0.9\nfail-on = "warning"')
    config = load_config(path)
    assert config.get("select") == ("PD001", "PD005", "PD006")
    assert config.get("max-sparsity") == 0.9
    assert config.get("fail-on") == "warning"


def test_config_applies_to_cli(runner: CliRunner, fixtures_dir: Path) -> None:
    _write_pyproject(Path.cwd(), 'ignore = ["PD001"]')
    code, out, _ = _check(runner, str(fixtures_dir / "vit_tiny_reparam.pt"))
    assert code == 0
    assert "settings from" in out


def test_cli_option_wins_over_config(runner: CliRunner, fixtures_dir: Path) -> None:
    _write_pyproject(Path.cwd(), "min-sparsity = 0.9")
    code, _, _ = _check(runner, "--min-sparsity", "0.3", str(fixtures_dir / "vit_tiny_normalized.pt"))
    assert code == 0


def test_no_config_ignores_file(runner: CliRunner, fixtures_dir: Path) -> None:
    _write_pyproject(Path.cwd(), "min-sparsity = 0.9")
    code, _, _ = _check(runner, "--no-config", str(fixtures_dir / "vit_tiny_normalized.pt"))
    assert code == 0


def test_unknown_config_key_exits_2(runner: CliRunner, fixtures_dir: Path) -> None:
    _write_pyproject(Path.cwd(), "min-sparsty = 0.5")
    code, _, err = _check(runner, str(fixtures_dir / "vit_tiny_normalized.pt"))
    assert code == 2
    assert "unknown key min-sparsty" in err


def test_invalid_config_value_exits_2(runner: CliRunner, fixtures_dir: Path) -> None:
    _write_pyproject(Path.cwd(), "max-sparsity = 1.5")
    code, _, err = _check(runner, str(fixtures_dir / "vit_tiny_normalized.pt"))
    assert code == 2
    assert "max-sparsity: expected a number between 0 and 1, got 1.5" in err


def test_swapped_range_rejected() -> None:
    with pytest.raises(PrunedoctorError, match="greater than max-sparsity"):
        resolve_options(ProjectConfig(), min_sparsity=0.8, max_sparsity=0.2)


def test_broken_pyproject_found_upward_exits_2(runner: CliRunner, fixtures_dir: Path) -> None:
    path = Path.cwd() / "pyproject.toml"
    path.write_text("[tool.prunedoctor\nmin-sparsity = 0.9\n", encoding="utf-8")
    code, out, err = _check(runner, str(fixtures_dir / "vit_tiny_normalized.pt"))
    assert code == 2
    assert err.strip() == (f"prunedoctor: error: {path.resolve()}: invalid TOML (Expected ']' at the end of a table "
                           "declaration (at line 1, column 18)); fix it, or --no-config skips it")
    assert "PASS" not in out


def test_find_config_rejects_broken_toml(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.prunedoctor\n", encoding="utf-8")
    with pytest.raises(PrunedoctorError, match=r"pyproject\.toml: invalid TOML .*--no-config skips it"):
        find_config(tmp_path)


def test_against_missing_names_against_file(runner: CliRunner, fixtures_dir: Path, tmp_path: Path) -> None:
    checked, missing = fixtures_dir / "vit_state2_revived.pt", tmp_path / "missing.pt"
    code, out, err = _check(runner, "--no-config", str(checked), "--against", str(missing))
    assert code == 2
    assert f"ERROR {checked}: --against {missing}: file not found" in out
    assert err.strip() == f"prunedoctor: error: {checked}: --against {missing}: file not found"


def test_unknown_container_named_container(runner: CliRunner, fixtures_dir: Path) -> None:
    checked = fixtures_dir / "vit_tiny_normalized.pt"
    code, _, err = _check(runner, "--no-config", str(checked), "--container", "nosuch")
    assert code == 2
    assert err.strip() == (f"prunedoctor: error: {checked}: --container 'nosuch' is not a state dict in the file; "
                           "candidates: (top level)")
