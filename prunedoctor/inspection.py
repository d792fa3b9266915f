"""Checkpoint analysis and the inspect report: the library part of ``prunedoctor inspect``.

:func:`analyze_checkpoint` measures every parameter once (sparsity, masks,
finiteness, shared storage) and collects the findings. :func:`build_report`
turns that analysis into a JSON-able dict whose layout is versioned by
:data:`REPORT_SCHEMA`. ``check`` runs its rules on the same analysis, so both
commands agree on every count.

Extra report sections (for example the ViT structure) plug in through
:func:`default_sections`: each section gets the checkpoint and its analysis
and returns a JSON-able dict for the report plus its own findings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunedoctor.errors import PrunedoctorError
from prunedoctor.findings import Finding
from prunedoctor.loading import Checkpoint, PageReleaser, load_checkpoint
from prunedoctor.reparam import (
    ParameterStats,
    ReparamIndex,
    index_reparametrization,
    iter_parameter_stats,
    validate_reparametrization,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "REPORT_SCHEMA",
    "SPARSITY_SCOPE",
    "Analysis",
    "ReportSection",
    "SectionResult",
    "analyze_checkpoint",
    "build_report",
    "default_sections",
    "inspect_checkpoint",
    "run_section",
]

_logger = logging.getLogger(__name__)

# Version of the JSON layout that build_report returns. Adding a key keeps the
# version; renaming or removing a key, or changing a value's meaning, bumps it.
REPORT_SCHEMA = "prunedoctor.inspect/1"

SPARSITY_SCOPE = "floating-point parameters with 2 or more dimensions, pairs merged"

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class SectionResult:
    """Output of one report section: its JSON-able data (None to omit the key) and its findings."""

    data: dict[str, Any] | None
    findings: list[Finding] = field(default_factory=list)


@dataclass(frozen=True)
class ReportSection:
    """An extra top-level key of the report, computed from the checkpoint and its analysis."""

    name: str
    build: Callable[[Checkpoint, Analysis], SectionResult]


@dataclass
class Analysis:
    """Everything measured on one checkpoint, shared by ``inspect`` and ``check``.

    Attributes:
        checkpoint: The loaded checkpoint.
        index: Where its ``*_orig``/``*_mask`` pairs, sidecar masks and orphans are.
        stats: Parameter name -> counts, in key order (pairs under the parameter name).
        shared_storage: Groups of keys whose tensors share one storage.
        findings: Findings of the loader, the reparametrization and the values,
            sorted by key and code. Report sections add theirs in :func:`build_report`.
    """

    checkpoint: Checkpoint
    index: ReparamIndex
    stats: dict[str, ParameterStats]
    shared_storage: list[list[str]]
    findings: list[Finding]

    def sparsity(self) -> dict[str, Any]:
        """Return the sparsity summary of the report (see :func:`build_report`)."""
        return _sparsity_summary(self.stats)


def analyze_checkpoint(checkpoint: Checkpoint, *, progress: ProgressCallback | None = None) -> Analysis:
    """Measure every parameter of ``checkpoint`` once and collect its findings.

    Tensors are read one parameter at a time and, for memory-mapped files,
    their pages are released after use, so the resident memory stays near
    the size of the largest parameter instead of the file's size.

    Args:
        checkpoint: A checkpoint from :func:`~prunedoctor.loading.load_checkpoint`.
        progress: Called as ``progress(done, total)`` after each parameter.

    Returns:
        The analysis. Findings: PD001-PD005, PD009 and PD011 from the
        reparametrization, PD006 non-finite values, PD007 unsafe globals
        (when the file was loaded with ``unsafe_load``), PD008 shared
        storage, PD012 stripped prefixes and PD013 the container path.
    """
    state_dict = checkpoint.state_dict
    index = index_reparametrization(state_dict.keys())
    releaser = PageReleaser(checkpoint.path)
    total = len(state_dict) - len(index.pairs) - len(index.sidecar_masks)
    stats: dict[str, ParameterStats] = {}
    for done, item in enumerate(iter_parameter_stats(state_dict, index), start=1):
        stats[item.name] = item
        releaser.release(state_dict[key] for key in item.keys)
        if progress is not None:
            progress(done, total)

    shared = _find_shared_storage(state_dict)
    findings = validate_reparametrization(state_dict, index, stats)
    findings += _value_findings(stats)
    findings += _loader_findings(checkpoint)
    findings += _shared_storage_findings(shared)
    findings.sort(key=lambda finding: (finding.key, finding.code))
    return Analysis(checkpoint, index, stats, shared, findings)


def default_sections(
    *, heads: int | None = None, model_name: str | None = None, min_heads: int = 1
) -> list[ReportSection]:
    """Return the extra report sections that ``inspect`` adds after the core keys.

    A section is added here by appending ``ReportSection(name, build)``;
    import the module that builds it inside this function, so that importing
    this module stays light.

    Args:
        heads: Head count for the ``vit`` section (a state dict does not store it).
        model_name: timm model name to take the head count from.
        min_heads: Minimum alive heads per block, below which PD022 is reported.
    """
    from prunedoctor.vit.section import vit_report_section

    return [vit_report_section(heads=heads, model_name=model_name, min_heads=min_heads)]


def build_report(
    checkpoint: Checkpoint,
    *,
    analysis: Analysis | None = None,
    include_tensors: bool = False,
    sections: Sequence[ReportSection] | None = None,
) -> dict[str, Any]:
    """Return the JSON-able inspect report of ``checkpoint``.

    Keys (schema :data:`REPORT_SCHEMA`): ``schema``, ``file``, ``format``,
    ``size_bytes``, ``container``, ``container_reason``, ``candidates``,
    ``prefixes``, ``metadata``, ``args``, ``unsafe_globals``, ``tensors``
    (tensors stored), ``parameter_tensors`` (parameters after merging pairs,
    masks excluded), ``parameters`` (their entries), ``bytes`` (bytes of all
    stored tensors), ``dtypes``, ``reparametrized`` (parameter names stored as
    pairs), ``sidecar_masks``, ``mask_bytes``, ``sparsity``, ``findings``,
    ``finding_counts``, one key per section, ``skipped_sections`` (section
    name -> reason) when a section could not be built, and ``tensor_list``
    when ``include_tensors`` is true.

    Args:
        checkpoint: The loaded checkpoint.
        analysis: Its analysis, computed when omitted.
        include_tensors: Add ``tensor_list``: every stored key with its shape,
            dtype, bytes and role.
        sections: Extra sections; :func:`default_sections` when omitted.
    """
    if analysis is None:
        analysis = analyze_checkpoint(checkpoint)
    if sections is None:
        sections = default_sections()
    state_dict = checkpoint.state_dict
    index = analysis.index
    mask_keys = [mask for _, mask in index.pairs.values()] + list(index.sidecar_masks.values())
    parameters = [item for item in analysis.stats.values() if item.kind != "orphan_mask"]

    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "file": str(checkpoint.path),
        "format": checkpoint.format,
        "size_bytes": checkpoint.size_bytes,
        "container": checkpoint.container,
        "container_reason": checkpoint.container_reason,
        "candidates": [
            {"path": candidate.path, "tensors": candidate.tensors, "note": candidate.note}
            for candidate in checkpoint.candidates
        ],
        "prefixes": list(checkpoint.prefixes),
        "metadata": checkpoint.metadata,
        "args": _json_safe(checkpoint.args) if checkpoint.args is not None else None,
        "unsafe_globals": list(checkpoint.unsafe_globals),
        "tensors": len(state_dict),
        "parameter_tensors": len(parameters),
        "parameters": sum(item.numel for item in parameters),
        "bytes": sum(_nbytes(tensor) for tensor in state_dict.values()),
        "dtypes": _count_dtypes(state_dict),
        "reparametrized": index.reparametrized,
        "sidecar_masks": sorted(index.sidecar_masks),
        "mask_bytes": sum(_nbytes(state_dict[key]) for key in mask_keys),
        "sparsity": analysis.sparsity(),
    }
    findings = list(analysis.findings)
    skipped: dict[str, str] = {}
    for section in sections:
        result = run_section(section, checkpoint, analysis)
        if isinstance(result, str):
            skipped[section.name] = result
            continue
        if result.data is not None:
            report[section.name] = result.data
        findings.extend(result.findings)
    if skipped:
        report["skipped_sections"] = skipped
    findings.sort(key=lambda finding: (finding.key, finding.code))
    report["findings"] = [finding.to_dict() for finding in findings]
    report["finding_counts"] = {
        severity: sum(1 for finding in findings if finding.severity == severity)
        for severity in ("error", "warning", "info")
    }
    if include_tensors:
        report["tensor_list"] = _tensor_list(state_dict, index)
    return report


def run_section(section: ReportSection, checkpoint: Checkpoint, analysis: Analysis) -> SectionResult | str:
    """Build one report section, or return why it could not be built.

    A section that raises :class:`~prunedoctor.errors.PrunedoctorError` (for
    example because a pair cannot be merged, which the core findings already
    report) is skipped instead of failing the whole report.
    """
    try:
        return section.build(checkpoint, analysis)
    except PrunedoctorError as error:
        _logger.warning("skipped the %s section of %s: %s", section.name, checkpoint.path, error)
        return str(error)


def inspect_checkpoint(
    path: str | Path,
    *,
    select: str | None = None,
    unsafe_load: bool = False,
    include_tensors: bool = False,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Load ``path`` and return its inspect report (see :func:`build_report`).

    Raises:
        CheckpointError: The file cannot be read or contains no state dict.
        UnsafeCheckpointError: The file needs unsafe globals and ``unsafe_load`` is false.
    """
    checkpoint = load_checkpoint(path, select=select, unsafe_load=unsafe_load)
    analysis = analyze_checkpoint(checkpoint, progress=progress)
    return build_report(checkpoint, analysis=analysis, include_tensors=include_tensors)


def _sparsity_summary(stats: dict[str, ParameterStats]) -> dict[str, Any]:
    """Return global, mask-based and per-layer sparsity.

    ``global`` counts zeros of the effective values over the floating-point
    parameters with two or more dimensions: weight matrices, convolution
    kernels and embeddings, but not biases and norms. A reparametrized file
    and its normalized twin therefore get the same value. ``masks``
    counts zeros of the masks over the parameters that have one, which is
    the fraction that ``torch.nn.utils.prune`` removed.
    """
    weights = [
        item
        for item in stats.values()
        if item.kind != "orphan_mask" and item.is_floating and len(item.shape) >= 2 and item.zeros is not None
    ]
    masked = [item for item in stats.values() if item.mask_zeros is not None and item.kind != "orphan_mask"]
    weight_entries = sum(item.numel for item in weights)
    weight_zeros = sum(item.zeros or 0 for item in weights)
    masked_entries = sum(item.numel for item in masked)
    mask_zeros = sum(item.mask_zeros or 0 for item in masked)
    masked_value_zeros = sum(item.zeros or 0 for item in masked)
    layers = [
        {
            "name": item.name,
            "shape": list(item.shape),
            "dtype": item.dtype,
            "entries": item.numel,
            "zeros": item.zeros,
            "sparsity": _round(item.sparsity),
            "mask_sparsity": _round(item.mask_sparsity),
        }
        for item in stats.values()
        if item.kind != "orphan_mask" and (item in weights or item.mask_key is not None)
    ]
    return {
        "global": _fraction(weight_zeros, weight_entries),
        "scope": SPARSITY_SCOPE,
        "entries": weight_entries,
        "zeros": weight_zeros,
        "masks": _fraction(mask_zeros, masked_entries),
        "masked_values": _fraction(masked_value_zeros, masked_entries),
        "masked_entries": masked_entries,
        "layers": layers,
    }


def _fraction(part: int, whole: int) -> float | None:
    return _round(part / whole) if whole else None


def _round(value: float | None) -> float | None:
    # Six decimals resolve one entry in a million; more digits only add noise to JSON diffs.
    return None if value is None else round(value, 6)


def _value_findings(stats: dict[str, ParameterStats]) -> list[Finding]:
    findings = []
    for item in stats.values():
        if item.nonfinite and item.kind != "orphan_mask":
            stored = item.keys[0]
            findings.append(
                Finding(
                    "PD006",
                    "error",
                    stored,
                    f"{stored} has {item.nonfinite} NaN or infinite values among {item.numel} entries",
                )
            )
    return findings


def _loader_findings(checkpoint: Checkpoint) -> list[Finding]:
    findings = []
    if checkpoint.loaded_unsafely:
        findings.append(
            Finding(
                "PD007",
                "warning",
                "<file>",
                f"loaded with --unsafe-load although the pickle needs globals outside the safe allowlist: "
                f"{', '.join(checkpoint.unsafe_globals)}; save plain tensors to make the file loadable "
                "with weights_only=True",
            )
        )
    if checkpoint.prefixes:
        findings.append(
            Finding(
                "PD012",
                "info",
                "<file>",
                f"stripped the prefix {''.join(checkpoint.prefixes)!r} that every key had "
                "(DataParallel/DistributedDataParallel adds 'module.', torch.compile adds '_orig_mod.')",
            )
        )
    if checkpoint.container:
        findings.append(
            Finding(
                "PD013",
                "info",
                "<file>",
                f"state dict taken from {checkpoint.container!r}: {checkpoint.container_reason}",
            )
        )
    return findings


def _find_shared_storage(state_dict: dict[str, torch.Tensor]) -> list[list[str]]:
    """Return groups of keys whose tensors use one storage, in key order."""
    groups: dict[int, list[str]] = {}
    for key, tensor in state_dict.items():
        if tensor.numel() == 0:
            continue
        groups.setdefault(tensor.untyped_storage().data_ptr(), []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def _shared_storage_findings(shared: list[list[str]]) -> list[Finding]:
    return [
        Finding(
            "PD008",
            "warning",
            keys[0],
            f"{', '.join(keys)} share one storage (tied or duplicated weights); safetensors files "
            "store them as separate copies",
        )
        for keys in shared
    ]


def _tensor_list(state_dict: dict[str, torch.Tensor], index: ReparamIndex) -> list[dict[str, Any]]:
    roles: dict[str, str] = {}
    for orig_key, mask_key in index.pairs.values():
        roles[orig_key], roles[mask_key] = "orig", "mask"
    for name, mask_key in index.sidecar_masks.items():
        roles[name], roles[mask_key] = "masked", "sidecar_mask"
    roles.update({key: "orphan_mask" for key in index.orphan_masks})
    roles.update({key: "orphan_orig" for key in index.orphan_origs})
    return [
        {
            "key": key,
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "bytes": _nbytes(tensor),
            "role": roles.get(key, "plain"),
        }
        for key, tensor in state_dict.items()
    ]


def _count_dtypes(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for tensor in state_dict.values():
        name = str(tensor.dtype).removeprefix("torch.")
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _json_safe(value: Any) -> Any:
    """Return ``value`` with everything that JSON cannot hold turned into a string."""
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return str(value)
