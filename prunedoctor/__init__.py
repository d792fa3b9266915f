"""Inspect, normalize, check, diff and re-run the pruning of ViT checkpoints.

The library computes and returns values; only :mod:`prunedoctor.cli` prints.
Heavy imports (torch, timm) happen inside the modules that need them, so that
``import prunedoctor`` and ``prunedoctor --help`` stay fast.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
