"""Model presets for ``prunedoctor reproduce``: timm ViTs for 32x32 inputs with patch 4.

``vit-tiny`` and ``vit-small`` are the sizes that public ViT head/MLP pruning
code uses for CIFAR, and ``vit-base`` has ViT-B's width and depth.
``vit-demo`` is small enough for a three-state CPU run on full CIFAR-10, and
``vit-micro`` is for tests and fixtures. Any other name is passed to
``timm.create_model`` and must build a ``VisionTransformer``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prunedoctor.errors import StructureError

if TYPE_CHECKING:
    import torch.nn as nn

__all__ = ["ModelPreset", "PRESETS", "build_model"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelPreset:
    """Shape of a preset ViT.

    Attributes:
        embed_dim: Token width.
        depth: Number of transformer blocks.
        num_heads: Attention heads per block.
        mlp_ratio: MLP hidden width divided by ``embed_dim``.
        patch_size: Patch side in pixels.
    """

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    patch_size: int = 4


PRESETS: dict[str, ModelPreset] = {
    "vit-tiny": ModelPreset(192, 9, 3, 2.0),
    "vit-small": ModelPreset(384, 12, 6, 4.0),
    "vit-base": ModelPreset(768, 12, 12, 4.0),
    "vit-demo": ModelPreset(64, 4, 4, 2.0),
    "vit-micro": ModelPreset(48, 3, 3, 2.0),
}


def build_model(name: str, *, num_classes: int, img_size: int, in_chans: int) -> nn.Module:
    """Create an untrained timm ``VisionTransformer`` from a preset or a timm model name.

    Never loads pretrained weights: the caller seeds the initialisation.

    Raises:
        StructureError: The name is neither a preset nor a timm ViT, or the image
            size is not a multiple of the patch size.
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    preset = PRESETS.get(name)
    if preset is not None:
        if img_size % preset.patch_size:
            raise StructureError(
                f"--img-size {img_size} is not a multiple of {name}'s patch size {preset.patch_size}"
            )
        return VisionTransformer(
            img_size=img_size,
            patch_size=preset.patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=preset.embed_dim,
            depth=preset.depth,
            num_heads=preset.num_heads,
            mlp_ratio=preset.mlp_ratio,
        )
    if not timm.is_model(name):
        raise StructureError(
            f"unknown model {name!r}: use a preset ({', '.join(PRESETS)}) or a timm ViT name such as "
            "vit_tiny_patch16_224 (list them with timm.list_models('vit_*'))"
        )
    try:
        model = timm.create_model(
            name, pretrained=False, num_classes=num_classes, img_size=img_size, in_chans=in_chans
        )
    except TypeError as error:
        # Non-ViT timm models reject the img_size argument.
        raise StructureError(
            f"timm cannot build {name!r} with img_size={img_size}: {error}; reproduce needs a timm "
            "VisionTransformer (a preset or a vit_* name)"
        ) from error
    except (ValueError, AssertionError, RuntimeError) as error:
        raise StructureError(f"timm cannot build {name!r} for {img_size}x{img_size} inputs: {error}") from error
    if not isinstance(model, VisionTransformer):
        raise StructureError(
            f"{name!r} builds a {type(model).__name__}, not a timm VisionTransformer; "
            "reproduce prunes ViT attention heads and MLP neurons only"
        )
    _logger.info("built timm model %s for %dx%d inputs, %d classes", name, img_size, img_size, num_classes)
    return model
