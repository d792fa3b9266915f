"""The committed fixtures are what fixtures/make_fixtures.py writes."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def _load_script(fixtures_dir: Path):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("make_fixtures", fixtures_dir / "make_fixtures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_fixtures", module)
    spec.loader.exec_module(module)
    return module


def _tensors(value: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten every tensor inside nested dicts, lists and namespaces to path -> tensor."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    items: list[tuple[str, object]] = []
    if isinstance(value, dict):
        items = [(str(key), item) for key, item in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [(str(index), item) for index, item in enumerate(value)]
    found: dict[str, torch.Tensor] = {}
    for key, item in items:
        found.update(_tensors(item, f"{prefix}/{key}"))
    return found


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def test_script_rewrites_committed_files(fixtures_dir: Path, tmp_path: Path) -> None:
    written = _load_script(fixtures_dir).make_fixtures(tmp_path)
    assert written
    for path in written:
        committed = fixtures_dir / path.name
        assert committed.is_file(), f"{path.name} is not committed; run python fixtures/make_fixtures.py"
        if path.name in ("broken_truncated.pt", "vit_tiny_unsafe_globals.pt"):
            assert path.stat().st_size == committed.stat().st_size, path.name
            continue
        if path.suffix == ".safetensors":
            assert path.read_bytes() == committed.read_bytes(), path.name
            continue
        with torch.serialization.safe_globals([argparse.Namespace]):
            fresh = _tensors(torch.load(path, weights_only=True))
            kept = _tensors(torch.load(committed, weights_only=True))
        assert fresh.keys() == kept.keys(), path.name
        for key in fresh:
            # Bytes, not values, because broken_nan.pt contains NaN, which never equals itself.
            assert torch.equal(_bits(fresh[key]), _bits(kept[key])), f"{path.name}: {key}"
