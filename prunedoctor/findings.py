"""Findings: the problems and facts that ``inspect`` reports and ``check`` enforces.

Each finding has a stable code. The codes are documented in the README and
must not change meaning between releases, because CI configurations select
and skip rules by code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["Finding", "Severity", "FINDING_CODES"]

Severity = Literal["error", "warning", "info"]

# Code -> one-line description, shown by ``prunedoctor check --list-rules``
# and in the README.
FINDING_CODES: dict[str, str] = {
    "PD001": "leftover pruning reparametrization (X_orig/X_mask instead of X)",
    "PD002": "orphan mask: X_mask without X_orig",
    "PD003": "orphan original: X_orig without X_mask",
    "PD004": "mask and original differ in shape",
    "PD005": "mask is not binary (entries other than exactly 0 and 1)",
    "PD006": "tensor has NaN or infinite values",
    "PD007": "checkpoint needs globals outside the safe allowlist",
    "PD008": "tensors share storage (tied or duplicated weights)",
    "PD009": "mask disagrees with values: weight is nonzero where its mask is 0",
    "PD010": "global sparsity outside the allowed range",
    "PD011": "mask and original differ in dtype class (mask is not float, bool or integer)",
    "PD012": "prefix stripped from keys (module., _orig_mod.)",
    "PD013": "state dict taken from inside a container",
    "PD020": "inconsistent attention head: exactly one side is entirely zero",
    "PD021": "inconsistent MLP neuron: exactly one side is entirely zero",
    "PD022": "block keeps fewer heads than the allowed minimum",
    "PD023": "unit pruned in the previous checkpoint is alive again",
    "PD024": "sparsity decreased compared with the previous checkpoint",
    "PD025": "head count assumed, not known",
}


@dataclass(frozen=True)
class Finding:
    """One problem or fact found in a checkpoint.

    Attributes:
        code: Stable identifier from :data:`FINDING_CODES`.
        severity: ``error`` fails ``check`` by default, ``warning`` and ``info``
            do not.
        key: State-dict key (or file-level subject such as ``<file>``) that
            the finding concerns.
        message: One sentence for a human reader.
    """

    code: str
    severity: Severity
    key: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
