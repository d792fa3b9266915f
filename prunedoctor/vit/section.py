"""The ViT structure as a section of ``inspect`` and as rules of ``check``.

:func:`vit_report_section` adds the ``vit`` key to the inspect report (and
its findings PD020, PD021, PD022 and PD025 to both commands);
:func:`check_structure_against` compares a checkpoint with the one it was
pruned from (PD023, PD024) when ``check --against PREVIOUS`` is given.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from prunedoctor.errors import CheckpointError, PrunedoctorError, StructureError
from prunedoctor.findings import Finding

if TYPE_CHECKING:
    from collections.abc import Mapping

    from prunedoctor.inspection import Analysis, ReportSection
    from prunedoctor.loading import Checkpoint
    from prunedoctor.reparam import ParameterStats
    from prunedoctor.vit.arch import VitArchitecture

__all__ = [
    "is_vit_state_dict",
    "build_structure_report",
    "vit_report_section",
    "check_head_options",
    "check_structure_against",
]

_QKV_KEY = re.compile(r"^blocks\.\d+\.attn\.qkv\.weight(_orig)?$")


def is_vit_state_dict(keys: Any) -> bool:
    """Return whether some key names a timm ViT attention layer (``blocks.N.attn.qkv.weight``)."""
    return any(_QKV_KEY.match(key) for key in keys)


def build_structure_report(
    checkpoint: Checkpoint,
    *,
    heads: int | None = None,
    model_name: str | None = None,
    arch: VitArchitecture | None = None,
    stats: Mapping[str, ParameterStats] | None = None,
) -> dict[str, Any]:
    """Return the structure report of a loaded checkpoint, inferring its architecture unless given.

    Args:
        checkpoint: The loaded checkpoint.
        heads: Head count of an unslimmed block, when the user knows it.
        model_name: timm model name to take the head count from.
        arch: The architecture, inferred from the checkpoint when omitted.
        stats: The checkpoint's measured stats (``Analysis.stats``). When they
            contain what the report needs, no tensor data is read again.
            Otherwise the report is built from the tensors. Both give the
            same report for binary masks (see
            :func:`~prunedoctor.vit.structure.build_vit_report_from_stats`).

    Raises:
        StructureError: The state dict is not a timm ViT or its shapes disagree.
        ReparametrizationError: An orig/mask pair cannot be merged.
    """
    from prunedoctor.reparam import effective_state_dict, index_reparametrization, masks_of
    from prunedoctor.vit.arch import infer_architecture
    from prunedoctor.vit.structure import build_vit_report, build_vit_report_from_stats, has_structure_stats

    state_dict = checkpoint.state_dict
    if arch is None:
        arch = infer_architecture(state_dict, heads=heads, model_name=model_name, args=checkpoint.args, stats=stats)
    if stats is not None and has_structure_stats(stats, arch):
        return build_vit_report_from_stats(stats, arch)
    index = index_reparametrization(state_dict.keys())
    return build_vit_report(effective_state_dict(state_dict, index), masks_of(state_dict, index), arch)


def vit_report_section(
    *, heads: int | None = None, model_name: str | None = None, min_heads: int = 1
) -> ReportSection:
    """Return the ``vit`` report section: the structure report and its findings.

    The section is left out for state dicts without ViT attention layers.

    Raises:
        StructureError: From the section's ``build``, when a ViT's shapes
            cannot be read or the head count does not fit them.
    """
    from prunedoctor.inspection import ReportSection, SectionResult
    from prunedoctor.vit.structure import structure_findings

    def build(checkpoint: Checkpoint, analysis: Analysis) -> SectionResult:
        if not is_vit_state_dict(checkpoint.state_dict):
            return SectionResult(None)
        report = build_structure_report(checkpoint, heads=heads, model_name=model_name, stats=analysis.stats)
        return SectionResult(report, structure_findings(report, min_heads=min_heads))

    return ReportSection("vit", build)


def check_head_options(checkpoint: Checkpoint, _analysis: Analysis, options: Any) -> list[Finding]:
    """Raise StructureError when a head count from ``options.heads`` or ``options.model`` does not fit a ViT.

    A ``vit`` section that cannot be built is skipped with a warning. This
    rule makes that an error when the user chose the head count, and it
    returns no findings.
    """
    from prunedoctor.vit.arch import infer_architecture

    heads, model_name = getattr(options, "heads", None), getattr(options, "model", None)
    if (heads is not None or model_name is not None) and is_vit_state_dict(checkpoint.state_dict):
        infer_architecture(checkpoint.state_dict, heads=heads, model_name=model_name, args=checkpoint.args)
    return []


def check_structure_against(checkpoint: Checkpoint, analysis: Analysis, options: Any) -> list[Finding]:
    """Return PD023 and PD024 findings of ``checkpoint`` against ``options.against``, if set.

    ``options`` supplies ``against`` (path of the previous checkpoint or
    None), ``heads`` and ``model`` (the head count and its source for both
    files).

    Raises:
        StructureError: Either file is not a ViT, or their block or unit counts differ.
        CheckpointError: The previous checkpoint cannot be read.
    """
    from prunedoctor.loading import load_checkpoint
    from prunedoctor.vit.arch import infer_paired_architectures
    from prunedoctor.vit.structure import compare_structure

    previous_path = getattr(options, "against", None)
    if previous_path is None:
        return []
    heads, model_name = getattr(options, "heads", None), getattr(options, "model", None)
    try:
        previous = load_checkpoint(previous_path)
    except PrunedoctorError as error:
        raise CheckpointError(f"--against {error}") from None
    if not is_vit_state_dict(previous.state_dict):
        raise StructureError(f"--against {previous.path}: has no blocks.N.attn.qkv weights, and --against compares "
                             "timm ViT checkpoints")
    if not is_vit_state_dict(checkpoint.state_dict):
        raise StructureError(f"{checkpoint.path}: --against compares timm ViT checkpoints, and this one has no "
                             "blocks.N.attn.qkv weights")
    arch_before, arch_after = infer_paired_architectures(
        previous.state_dict, checkpoint.state_dict, heads=heads, model_name=model_name,
        args_a=previous.args, args_b=checkpoint.args, stats_b=analysis.stats,
    )
    # The previous checkpoint was not measured, so its report reads its tensors.
    before = build_structure_report(previous, arch=arch_before)
    after = build_structure_report(checkpoint, arch=arch_after, stats=analysis.stats)
    return compare_structure(before, after)
