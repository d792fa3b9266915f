"""The checkpoint loader: formats, containers, prefixes, safe unpickling, memory mapping."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch

from prunedoctor.errors import CheckpointError, UnsafeCheckpointError
from prunedoctor.loading import PageReleaser, detect_format, load_checkpoint, strip_prefixes

PAIR_KEY = "blocks.0.attn.qkv.weight_orig"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("vit_tiny_reparam.pt", "torch-zip"),
        ("vit_tiny_legacy.pth", "torch-legacy"),
        ("vit_tiny_reparam.safetensors", "safetensors"),
    ],
)
def test_format_detected_from_content(fixtures_dir: Path, name: str, expected: str) -> None:
    assert load_checkpoint(fixtures_dir / name).format == expected


def test_misnamed_safetensors_loads(fixtures_dir: Path, tmp_path: Path) -> None:
    misnamed = tmp_path / "weights.pt"
    shutil.copy(fixtures_dir / "vit_tiny_reparam.safetensors", misnamed)
    assert detect_format(misnamed) == "safetensors"
    assert PAIR_KEY in load_checkpoint(misnamed).state_dict


def test_formats_give_same_tensors(fixtures_dir: Path) -> None:
    reference = load_checkpoint(fixtures_dir / "vit_tiny_reparam.pt").state_dict
    for name in ("vit_tiny_legacy.pth", "vit_tiny_reparam.safetensors"):
        other = load_checkpoint(fixtures_dir / name).state_dict
        assert set(other) == set(reference), name
        assert all(torch.equal(other[key], reference[key]) for key in reference), name


def test_dataparallel_prefix_stripped(fixtures_dir: Path) -> None:
    checkpoint = load_checkpoint(fixtures_dir / "vit_tiny_dataparallel.pt")
    assert checkpoint.prefixes == ["module."]
    assert PAIR_KEY in checkpoint.state_dict


def test_nested_prefixes_stripped(fixtures_dir: Path) -> None:
    checkpoint = load_checkpoint(fixtures_dir / "vit_tiny_dp_compiled.pt")
    assert checkpoint.prefixes == ["module.", "_orig_mod."]
    assert PAIR_KEY in checkpoint.state_dict


def test_prefix_kept_unless_shared() -> None:
    stripped, prefixes = strip_prefixes({"module.a": 1, "b": 2})
    assert prefixes == []
    assert list(stripped) == ["module.a", "b"]


def test_prefixes_any_order() -> None:
    stripped, prefixes = strip_prefixes({"_orig_mod.module.a": 1, "_orig_mod.module.b": 2})
    assert prefixes == ["_orig_mod.", "module."]
    assert list(stripped) == ["a", "b"]


def test_training_container_model_chosen(fixtures_dir: Path) -> None:
    checkpoint = load_checkpoint(fixtures_dir / "vit_tiny_train_container.pt")
    assert checkpoint.container == "model"
    assert set(checkpoint.metadata) == {"epoch", "optimizer", "args", "best_acc1"}


def test_training_args_read(fixtures_dir: Path) -> None:
    checkpoint = load_checkpoint(fixtures_dir / "vit_tiny_train_container.pt")
    assert checkpoint.args is not None
    assert checkpoint.args["prune_rate"] == 0.5


def test_ema_candidates_listed(fixtures_dir: Path) -> None:
    checkpoint = load_checkpoint(fixtures_dir / "vit_tiny_ema.pt")
    assert checkpoint.container == "state_dict"
    assert [candidate.path for candidate in checkpoint.candidates] == ["state_dict", "state_dict_ema"]
    assert "--select" in checkpoint.container_reason


def test_select_chooses_ema(fixtures_dir: Path) -> None:
    live = load_checkpoint(fixtures_dir / "vit_tiny_ema.pt").state_dict
    ema = load_checkpoint(fixtures_dir / "vit_tiny_ema.pt", select="state_dict_ema").state_dict
    assert not torch.equal(live[PAIR_KEY], ema[PAIR_KEY])


def test_unknown_select_lists_candidates(fixtures_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="'state_dict', 'state_dict_ema'"):
        load_checkpoint(fixtures_dir / "vit_tiny_ema.pt", select="model_ema")


def test_nested_container_found(tmp_path: Path) -> None:
    path = tmp_path / "nested.pt"
    torch.save({"checkpoint": {"model": {"w": torch.ones(2), "b": torch.zeros(2)}, "step": 5}}, path)
    checkpoint = load_checkpoint(path)
    assert checkpoint.container == "checkpoint/model"
    assert list(checkpoint.state_dict) == ["w", "b"]


def test_no_state_dict_rejected(tmp_path: Path) -> None:
    path = tmp_path / "numbers.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_checkpoint(path)


def test_unsafe_globals_listed(fixtures_dir: Path) -> None:
    with pytest.raises(UnsafeCheckpointError, match=r"datetime\.datetime.*--unsafe-load") as caught:
        load_checkpoint(fixtures_dir / "vit_tiny_unsafe_globals.pt")
    assert caught.value.unsafe_globals == ["datetime.datetime"]


def test_unsafe_load_opt_in(fixtures_dir: Path) -> None:
    checkpoint = load_checkpoint(fixtures_dir / "vit_tiny_unsafe_globals.pt", unsafe_load=True)
    assert checkpoint.loaded_unsafely
    assert checkpoint.unsafe_globals == ["datetime.datetime"]


def test_namespace_args_load_safely(tmp_path: Path) -> None:
    path = tmp_path / "args.pt"
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=0.1)}, path)
    checkpoint = load_checkpoint(path)
    assert not checkpoint.unsafe_globals
    assert checkpoint.args == {"lr": 0.1}


def test_zip_tensors_memory_mapped(fixtures_dir: Path) -> None:
    checkpoint = load_checkpoint(fixtures_dir / "vit_tiny_reparam.pt")
    tensor = checkpoint.state_dict[PAIR_KEY]
    assert PageReleaser(checkpoint.path).is_mapped(tensor)


def test_released_pages_read_back(tmp_path: Path) -> None:
    path = tmp_path / "big.pt"
    torch.save({"w": torch.arange(1 << 16, dtype=torch.float32)}, path)
    checkpoint = load_checkpoint(path)
    before = checkpoint.state_dict["w"].clone()
    PageReleaser(path).release(checkpoint.state_dict.values())
    assert torch.equal(checkpoint.state_dict["w"], before)


def test_release_skips_anonymous_memory(tmp_path: Path) -> None:
    path = tmp_path / "small.pt"
    torch.save({"w": torch.ones(1)}, path)
    load_checkpoint(path)
    in_memory = torch.arange(1 << 16, dtype=torch.float32)
    releaser = PageReleaser(path)
    assert not releaser.is_mapped(in_memory)
    releaser.release([in_memory])
    assert torch.equal(in_memory, torch.arange(1 << 16, dtype=torch.float32))


def test_empty_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    path.touch()
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(path)


def test_truncated_zip_rejected(fixtures_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(fixtures_dir / "broken_truncated.pt")
