"""Vision Transformer structure: architecture, unit states, head/MLP pruning.

Submodules import torch and timm lazily, inside functions, so importing
this package stays cheap.
"""

from prunedoctor.vit.arch import (
    VitArchitecture,
    build_timm_model,
    infer_architecture,
    infer_paired_architectures,
    load_weights_strictly,
)
from prunedoctor.vit.pruning import (
    PruneConfig,
    PruneResult,
    activation_score_key,
    compute_activation_scores,
    global_magnitude_mask,
    prunable_weight_names,
    prune_units,
)

__all__ = [
    "VitArchitecture",
    "infer_architecture",
    "infer_paired_architectures",
    "build_timm_model",
    "load_weights_strictly",
    "PruneConfig",
    "PruneResult",
    "prunable_weight_names",
    "global_magnitude_mask",
    "prune_units",
    "compute_activation_scores",
    "activation_score_key",
]
