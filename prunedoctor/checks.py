"""The rules of ``prunedoctor check``: findings that fail a CI job.

A file's findings are those of its inspection (:func:`~prunedoctor.inspection.analyze_checkpoint`
plus the report sections) and of the check-only rules in :func:`default_rules`,
which need options (a sparsity range, and later structure limits). Findings
are kept or dropped by code with ``select``/``ignore``; a kept finding fails
the file when its severity is at least ``fail_on``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunedoctor.config import SEVERITIES, ProjectConfig
from prunedoctor.errors import PrunedoctorError
from prunedoctor.findings import Finding, Severity
from prunedoctor.inspection import Analysis, ProgressCallback, analyze_checkpoint, default_sections, run_section
from prunedoctor.loading import Checkpoint, load_checkpoint

__all__ = [
    "CHECK_SCHEMA",
    "CheckOptions",
    "CheckResult",
    "FileResult",
    "Rule",
    "check_checkpoint",
    "check_checkpoints",
    "default_rules",
    "resolve_options",
]

_logger = logging.getLogger(__name__)

# Version of the JSON layout of CheckResult.to_dict, bumped like the inspect schema.
CHECK_SCHEMA = "prunedoctor.check/1"


@dataclass(frozen=True)
class CheckOptions:
    """Settings of the rules that ``check`` enforces.

    Attributes:
        select: Codes to keep; None keeps every code.
        ignore: Codes to drop (applied after ``select``).
        min_sparsity: Lowest allowed global sparsity (0 to 1), rule PD010.
        max_sparsity: Highest allowed global sparsity (0 to 1), rule PD010.
        fail_on: Lowest severity of a kept finding that fails a file.
        min_heads: Minimum alive heads per ViT block, rule PD022.
        heads: Head count of the ViT blocks, when the user gives it.
        model: timm model name to take the head count from.
        against: Previous checkpoint for rules PD023 and PD024, or None.
    """

    select: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()
    min_sparsity: float | None = None
    max_sparsity: float | None = None
    fail_on: Severity = "error"
    min_heads: int = 1
    heads: int | None = None
    model: str | None = None
    against: Path | None = None

    def is_kept(self, code: str) -> bool:
        """Return whether findings with ``code`` are reported under ``select`` and ``ignore``."""
        return (self.select is None or code in self.select) and code not in self.ignore

    def is_failing(self, finding: Finding) -> bool:
        """Return whether a kept ``finding`` fails the check under ``fail_on``."""
        return SEVERITIES.index(finding.severity) <= SEVERITIES.index(self.fail_on)

    def to_dict(self) -> dict[str, Any]:
        """Return the options as JSON-able values."""
        return {
            "select": list(self.select) if self.select is not None else None,
            "ignore": list(self.ignore),
            "min_sparsity": self.min_sparsity,
            "max_sparsity": self.max_sparsity,
            "fail_on": self.fail_on,
            "min_heads": self.min_heads,
            "heads": self.heads,
            "model": self.model,
            "against": str(self.against) if self.against is not None else None,
        }


Rule = Callable[[Checkpoint, Analysis, CheckOptions], list[Finding]]


def resolve_options(config: ProjectConfig, **command_line: Any) -> CheckOptions:
    """Merge command-line values over ``[tool.prunedoctor]`` values over the defaults.

    Args:
        config: Values from the project's ``pyproject.toml``.
        **command_line: ``CheckOptions`` field names to values; None means "not given".

    Raises:
        PrunedoctorError: ``min_sparsity`` is greater than ``max_sparsity``.
    """
    merged: dict[str, Any] = {}
    for key, value in config.values.items():
        merged[key.replace("-", "_")] = value
    merged.update({key: value for key, value in command_line.items() if value is not None})
    if merged.get("select") is not None:
        merged["select"] = tuple(merged["select"])
    merged["ignore"] = tuple(merged.get("ignore", ()))
    options = CheckOptions(**merged)
    low, high = options.min_sparsity, options.max_sparsity
    if low is not None and high is not None and low > high:
        source = f" (after reading {config.path})" if config.path else ""
        raise PrunedoctorError(f"min-sparsity {low} is greater than max-sparsity {high}{source}; swap or fix them")
    return options


def default_rules() -> list[Rule]:
    """Return the check-only rules, run after the inspection findings.

    A rule that needs options (a structure limit, a previous checkpoint)
    is appended here; it reads its settings from :class:`CheckOptions`.
    """
    from prunedoctor.vit.section import check_head_options, check_structure_against

    return [check_sparsity_range, check_head_options, check_structure_against]


def check_sparsity_range(checkpoint: Checkpoint, analysis: Analysis, options: CheckOptions) -> list[Finding]:
    """Return PD010 when the global sparsity is outside ``[min_sparsity, max_sparsity]``."""
    if options.min_sparsity is None and options.max_sparsity is None:
        return []
    sparsity = analysis.sparsity()
    value = sparsity["global"]
    if value is None:
        return [Finding("PD010", "error", "<file>", "no floating-point weights with 2 or more dimensions to measure")]
    low = options.min_sparsity if options.min_sparsity is not None else 0.0
    high = options.max_sparsity if options.max_sparsity is not None else 1.0
    if low <= value <= high:
        return []
    return [
        Finding(
            "PD010",
            "error",
            "<file>",
            f"global sparsity {value:.4f} ({sparsity['zeros']} of {sparsity['entries']} entries are zero) "
            f"is outside the allowed range [{low:g}, {high:g}]",
        )
    ]


@dataclass
class FileResult:
    """The outcome of checking one file.

    Attributes:
        path: The file.
        findings: Kept findings, sorted by key and code.
        failures: The kept findings that fail the file.
        sparsity: Global sparsity, or None when it could not be measured.
        error: Why the file could not be checked (bad input); None when it was.
    """

    path: Path
    findings: list[Finding] = field(default_factory=list)
    failures: list[Finding] = field(default_factory=list)
    sparsity: float | None = None
    error: str | None = None

    @property
    def passed(self) -> bool:
        """Whether the file was read and no kept finding fails it."""
        return self.error is None and not self.failures

    def to_dict(self) -> dict[str, Any]:
        """Return the result as JSON-able values."""
        return {
            "file": str(self.path),
            "passed": self.passed,
            "error": self.error,
            "sparsity": self.sparsity,
            "failures": len(self.failures),
            "findings": [finding.to_dict() for finding in self.findings],
        }


@dataclass
class CheckResult:
    """The outcome of checking several files with one set of options."""

    files: list[FileResult]
    options: CheckOptions
    config_path: Path | None = None

    @property
    def passed(self) -> bool:
        """Whether every file was read and passed."""
        return all(result.passed for result in self.files)

    @property
    def exit_code(self) -> int:
        """Return 2 when a file could not be read, else 1 when a file failed, else 0."""
        if any(result.error is not None for result in self.files):
            return 2
        return 0 if self.passed else 1

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON layout of ``check --format json`` (schema :data:`CHECK_SCHEMA`)."""
        return {
            "schema": CHECK_SCHEMA,
            "passed": self.passed,
            "exit_code": self.exit_code,
            "config": str(self.config_path) if self.config_path else None,
            "options": self.options.to_dict(),
            "files": [result.to_dict() for result in self.files],
        }


def check_checkpoint(
    checkpoint: Checkpoint,
    options: CheckOptions,
    *,
    rules: Sequence[Rule] | None = None,
    progress: ProgressCallback | None = None,
) -> FileResult:
    """Run the inspection findings and the check rules on one loaded checkpoint."""
    analysis = analyze_checkpoint(checkpoint, progress=progress)
    findings = list(analysis.findings)
    # Rules run first: one that rejects an option (a head count that does not
    # fit) then fails the file before a section is skipped with a warning.
    for rule in rules if rules is not None else default_rules():
        findings.extend(rule(checkpoint, analysis, options))
    for section in default_sections(heads=options.heads, model_name=options.model, min_heads=options.min_heads):
        result = run_section(section, checkpoint, analysis)
        if not isinstance(result, str):
            findings.extend(result.findings)
    kept = sorted((finding for finding in findings if options.is_kept(finding.code)),
                  key=lambda finding: (finding.key, finding.code))
    return FileResult(
        path=checkpoint.path,
        findings=kept,
        failures=[finding for finding in kept if options.is_failing(finding)],
        sparsity=analysis.sparsity()["global"],
    )


def check_checkpoints(
    paths: Iterable[str | Path],
    options: CheckOptions,
    *,
    container: str | None = None,
    unsafe_load: bool = False,
    rules: Sequence[Rule] | None = None,
    config_path: Path | None = None,
    on_file: Callable[[Path], ProgressCallback | None] | None = None,
) -> CheckResult:
    """Check each file; a file that cannot be loaded gets ``error`` instead of findings.

    Args:
        paths: Checkpoint files.
        options: The rules' settings.
        container: Key path of the state dict inside each file (the loader's ``select``).
        unsafe_load: Load pickles that need globals outside the allowlist.
        rules: Check-only rules; :func:`default_rules` when omitted.
        config_path: The configuration file the options came from, for the report.
        on_file: Called with each path before it is checked; may return a
            progress callback for that file's analysis.
    """
    results = []
    for raw in paths:
        path = Path(raw)
        progress = on_file(path) if on_file is not None else None
        try:
            checkpoint = load_checkpoint(path, select=container, unsafe_load=unsafe_load)
            results.append(check_checkpoint(checkpoint, options, rules=rules, progress=progress))
        except PrunedoctorError as error:
            _logger.debug("cannot check %s: %s", path, error)
            results.append(FileResult(path=path, error=_describe_error(path, str(error), container)))
    return CheckResult(results, options, config_path)


def _describe_error(path: Path, message: str, container: str | None) -> str:
    """Return ``message`` in check's terms: led by the checked file, the loader's ``--select`` named ``--container``."""
    if container is not None:
        message = message.replace(f"--select {container!r} is not", f"--container {container!r} is not", 1)
        head, separator, listed = message.partition("; candidates: ")
        if separator:
            names = ["(top level)" if name == "''" else name for name in listed.split(", ")]
            message = head + separator + ", ".join(names)
    if not message.startswith(f"{path}:"):
        message = f"{path}: {message}"
    return message
