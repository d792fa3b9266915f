"""Shared test fixtures: paths to the committed checkpoints, a tiny real ViT, a CLI runner."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    """The committed fixture checkpoints (written by fixtures/make_fixtures.py)."""
    return FIXTURES


@pytest.fixture
def runner() -> CliRunner:
    """A typer CliRunner; ``result.stdout`` and ``result.stderr`` are captured apart."""
    return CliRunner()


def make_tiny_vit(seed: int = 0) -> VisionTransformer:
    """Return a seeded timm ViT of the fixtures' shape: 32x32 input, patch 8, width 48, 2 blocks, 4 heads."""
    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=2, num_classes=10
    ).eval()


@pytest.fixture
def tiny_vit() -> Callable[..., VisionTransformer]:
    """Factory of seeded tiny timm ViTs (see :func:`make_tiny_vit`)."""
    return make_tiny_vit
