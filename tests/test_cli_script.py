"""The installed console script and ``python -m prunedoctor``, run as real subprocesses."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _script() -> str:
    beside = Path(sys.executable).with_name("prunedoctor")
    if beside.is_file():
        return str(beside)
    found = shutil.which("prunedoctor")
    if found is None:
        pytest.skip("the prunedoctor console script is not installed; run pip install -e .")
    return found


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd, check=False)


def test_help_skips_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from prunedoctor.cli.app import app\n"
        "try:\n"
        "    app(['--help'], prog_name='prunedoctor')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules)\n"
    )
    result = _run(sys.executable, "-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_script_version(tmp_path: Path) -> None:
    result = _run(_script(), "--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("prunedoctor ")


def test_module_entry_version(tmp_path: Path) -> None:
    result = _run(sys.executable, "-m", "prunedoctor", "--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("prunedoctor ")


def test_script_inspect_fixture(fixtures_dir: Path, tmp_path: Path) -> None:
    result = _run(_script(), "inspect", str(fixtures_dir / "vit_tiny_reparam.pt"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "10 parameters stored as _orig/_mask pairs" in result.stdout
    assert result.stderr == ""


def test_script_normalize_then_check(fixtures_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "plain.safetensors"
    normalized = _run(_script(), "normalize", str(fixtures_dir / "vit_tiny_reparam.pt"), "-o", str(output),
                      cwd=tmp_path)
    assert normalized.returncode == 0, normalized.stderr
    checked = _run(_script(), "check", "--no-config", str(fixtures_dir / "vit_tiny_reparam.pt"), str(output),
                   cwd=tmp_path)
    assert checked.returncode == 1
    assert "1 passed, 1 failed" in checked.stdout


def test_script_bad_input_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint\n", encoding="utf-8")
    result = _run(_script(), "inspect", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("prunedoctor: error: ")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["prune", "x.pt", "-o", "y.pt", "--head-ratio", "-0.5"], "Invalid value for '--head-ratio'"),
        (["prune", "x.pt", "-o", "y.pt", "--criterion", "foo"], "'foo' is not one of"),
        (["check", "--format", "xml", "x.pt"], "Invalid value for '--format'"),
        (["inspect"], "Missing argument 'checkpoint'"),
        (["inspect", "--bogus", "x.pt"], "No such option: --bogus"),
        (["nosuch"], "No such command 'nosuch'"),
    ],
)
def test_script_usage_error_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    result = _run(_script(), *args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("prunedoctor: error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr
