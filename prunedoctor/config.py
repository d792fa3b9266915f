"""Defaults for ``prunedoctor check`` from ``[tool.prunedoctor]`` in a ``pyproject.toml``.

Example::

    [tool.prunedoctor]
    select = ["PD001", "PD002", "PD005", "PD006", "PD010"]
    ignore = ["PD008"]
    min-sparsity = 0.5
    max-sparsity = 0.95
    fail-on = "error"

The nearest ``pyproject.toml`` with a ``[tool.prunedoctor]`` table, searched
from the current directory upward, applies. Options given on the command
line win over the file. Each option is declared once in
:data:`CONFIG_OPTIONS` with the function that validates its value.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunedoctor.errors import PrunedoctorError
from prunedoctor.findings import FINDING_CODES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "CONFIG_FILE",
    "CONFIG_OPTIONS",
    "SEVERITIES",
    "ConfigOption",
    "ConfigValueError",
    "ProjectConfig",
    "find_config",
    "load_config",
    "parse_codes",
    "parse_fraction",
    "parse_severity",
]

CONFIG_FILE = "pyproject.toml"
SEVERITIES = ("error", "warning", "info")


class ConfigValueError(ValueError):
    """Invalid configuration value. The message describes the problem and the caller adds the option name."""


def parse_codes(value: Any) -> tuple[str, ...]:
    """Return finding codes from a list of strings or a comma-separated string, upper-cased and checked.

    Raises:
        ConfigValueError: The value is not a list of strings, or a code is unknown.
    """
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        items = [part for item in value for part in item.split(",")]
    else:
        raise ConfigValueError(f"expected a list of finding codes, got {value!r}")
    codes = tuple(dict.fromkeys(item.strip().upper() for item in items if item.strip()))
    unknown = [code for code in codes if code not in FINDING_CODES]
    if unknown:
        raise ConfigValueError(
            f"unknown finding code {', '.join(unknown)}; known codes: {', '.join(FINDING_CODES)}"
        )
    return codes


def parse_fraction(value: Any) -> float:
    """Return a number between 0 and 1 inclusive.

    Raises:
        ConfigValueError: The value is not a number in [0, 1].
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigValueError(f"expected a number between 0 and 1, got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigValueError(f"expected a number between 0 and 1, got {value!r}")
    return float(value)


def parse_severity(value: Any) -> str:
    """Return ``error``, ``warning`` or ``info``.

    Raises:
        ConfigValueError: The value is another string or not a string.
    """
    if value not in SEVERITIES:
        raise ConfigValueError(f"expected one of {', '.join(SEVERITIES)}, got {value!r}")
    return str(value)


@dataclass(frozen=True)
class ConfigOption:
    """One key of ``[tool.prunedoctor]``: the validator of its value and a line of help."""

    parse: Callable[[Any], Any]
    help: str


# TOML key -> option. A new option of ``check`` is added here, as a field of
# CheckOptions in prunedoctor.checks and as a command-line option.
CONFIG_OPTIONS: dict[str, ConfigOption] = {
    "select": ConfigOption(parse_codes, "finding codes to report; all codes when absent"),
    "ignore": ConfigOption(parse_codes, "finding codes to skip"),
    "min-sparsity": ConfigOption(parse_fraction, "lowest allowed global sparsity, 0 to 1 (rule PD010)"),
    "max-sparsity": ConfigOption(parse_fraction, "highest allowed global sparsity, 0 to 1 (rule PD010)"),
    "fail-on": ConfigOption(parse_severity, "lowest severity that fails the check: error, warning or info"),
}


@dataclass(frozen=True)
class ProjectConfig:
    """Validated ``[tool.prunedoctor]`` values, keyed by TOML key, and the file they came from."""

    path: Path | None = None
    values: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        """Return the value of TOML key ``key`` (for example ``min-sparsity``), or ``default``."""
        return self.values.get(key, default)


def find_config(start: Path | None = None) -> Path | None:
    """Return the nearest ``pyproject.toml`` with a ``[tool.prunedoctor]`` table, from ``start`` upward.

    The search stops at the first ``pyproject.toml`` that cannot be read or
    parsed, since it may hold the table.

    Raises:
        PrunedoctorError: A ``pyproject.toml`` on the way cannot be read or is
            not valid TOML.
    """
    directory = (start or Path.cwd()).resolve()
    for folder in (directory, *directory.parents):
        candidate = folder / CONFIG_FILE
        if not candidate.is_file():
            continue
        try:
            with candidate.open("rb") as handle:
                document = tomllib.load(handle)
        except OSError as error:
            raise PrunedoctorError(
                f"{candidate}: cannot read the configuration ({error.strerror or error}); "
                "--no-config skips it"
            ) from None
        except tomllib.TOMLDecodeError as error:
            raise PrunedoctorError(f"{candidate}: invalid TOML ({error}); fix it, or --no-config skips it") from None
        if isinstance(document.get("tool"), dict) and "prunedoctor" in document["tool"]:
            return candidate
    return None


def load_config(path: Path | None = None, *, start: Path | None = None) -> ProjectConfig:
    """Read and validate ``[tool.prunedoctor]``.

    Args:
        path: A TOML file to read; without it, :func:`find_config` searches
            from ``start`` (default: the current directory) upward.
        start: Where the search begins when ``path`` is None.

    Returns:
        The validated values, or an empty config when no file applies.

    Raises:
        PrunedoctorError: The file cannot be read or parsed, the table is not a
            table, a key is unknown, or a value is invalid.
    """
    if path is None:
        path = find_config(start)
        if path is None:
            return ProjectConfig()
    try:
        with Path(path).open("rb") as handle:
            document = tomllib.load(handle)
    except OSError as error:
        raise PrunedoctorError(f"{path}: cannot read the configuration ({error.strerror or error})") from None
    except tomllib.TOMLDecodeError as error:
        raise PrunedoctorError(f"{path}: invalid TOML ({error})") from None
    table = document.get("tool", {}).get("prunedoctor", {}) if isinstance(document.get("tool"), dict) else {}
    if not isinstance(table, dict):
        raise PrunedoctorError(f"{path}: [tool.prunedoctor] must be a table, got {table!r}")
    unknown = sorted(key for key in table if key not in CONFIG_OPTIONS)
    if unknown:
        raise PrunedoctorError(
            f"{path}: unknown key {', '.join(unknown)} in [tool.prunedoctor]; "
            f"known keys: {', '.join(CONFIG_OPTIONS)}"
        )
    values: dict[str, Any] = {}
    for key, raw in table.items():
        try:
            values[key] = CONFIG_OPTIONS[key].parse(raw)
        except ConfigValueError as error:
            raise PrunedoctorError(f"{path}: [tool.prunedoctor] {key}: {error}") from None
    return ProjectConfig(Path(path), values)
