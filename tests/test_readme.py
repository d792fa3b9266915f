"""The README's fresh-machine commands and the CI script agree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```(?:sh|bash|console)?\n(.*?)```", text, flags=re.S)
    return [block.strip() for block in blocks]


def test_readme_starts_with_two_commands() -> None:
    commands = _readme_commands()
    assert len(commands) >= 2
    install_and_run, install_and_test = commands[0], commands[1]
    assert "prunedoctor inspect fixtures/" in install_and_run
    assert "pytest" in install_and_test


def test_readme_fixture_exists() -> None:
    install_and_run = _readme_commands()[0]
    fixture = re.search(r"fixtures/\S+", install_and_run)
    assert fixture is not None
    assert (ROOT / fixture.group(0)).is_file()


def test_ci_runs_readme_test_command() -> None:
    ci_script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_lines = [line.strip() for line in ci_script.splitlines() if line.strip() and not line.startswith("#")]
    assert _readme_commands()[1] in ci_lines
