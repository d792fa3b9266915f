"""The atomic writer: bit-exact round trips, overwrite protection, no debris after failures."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from prunedoctor import io as pd_io
from prunedoctor.errors import OutputExistsError, PrunedoctorError
from prunedoctor.io import format_from_path, save_state_dict

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool]


def _random_tensor(seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        values = torch.randn(shape, generator=generator).to(dtype)
        if values.numel():
            values.view(-1)[0] = -0.0  # signed zero must survive byte for byte
        return values
    return torch.randint(0, 100, shape, generator=generator).to(dtype)


def _same_bytes(first: torch.Tensor, second: torch.Tensor) -> bool:
    if first.dtype != second.dtype or first.shape != second.shape:
        return False
    return torch.equal(first.contiguous().reshape(-1).view(torch.uint8), second.contiguous().reshape(-1).view(torch.uint8))


state_dicts = st.dictionaries(
    keys=st.from_regex(r"[a-z]{1,6}(\.[a-z0-9_]{1,6}){0,2}", fullmatch=True),
    values=st.tuples(
        st.integers(0, 2**16),
        st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),
        st.sampled_from(DTYPES),
    ),
    min_size=1,
    max_size=5,
).map(lambda spec: {key: _random_tensor(*value) for key, value in spec.items()})


@settings(max_examples=25, deadline=None)
@given(tensors=state_dicts)
def test_pt_round_trip_bit_exact(tmp_path_factory: pytest.TempPathFactory, tensors: dict[str, torch.Tensor]) -> None:
    path = tmp_path_factory.mktemp("pt") / "out.pt"
    save_state_dict(tensors, path)
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == list(tensors)
    for key, tensor in tensors.items():
        assert _same_bytes(loaded[key], tensor), key


@settings(max_examples=25, deadline=None)
@given(tensors=state_dicts)
def test_safetensors_round_trip_bit_exact(
    tmp_path_factory: pytest.TempPathFactory, tensors: dict[str, torch.Tensor]
) -> None:
    path = tmp_path_factory.mktemp("st") / "out.safetensors"
    save_state_dict(tensors, path)
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for key, tensor in tensors.items():
        assert _same_bytes(loaded[key], tensor), key


def test_safetensors_accepts_shared_views(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"weight": base, "tied": base, "transposed": base.t(), "rows": base[1:3], "column": base[:, 2]}
    save_state_dict(tensors, tmp_path / "shared.safetensors")
    loaded = load_file(tmp_path / "shared.safetensors")
    for key, tensor in tensors.items():
        assert torch.equal(loaded[key], tensor), key


def test_pt_keeps_tied_storage(tmp_path: Path) -> None:
    base = torch.randn(8, 8)
    save_state_dict({"a": base, "b": base}, tmp_path / "tied.pt")
    loaded = torch.load(tmp_path / "tied.pt", weights_only=True)
    assert loaded["a"].untyped_storage().data_ptr() == loaded["b"].untyped_storage().data_ptr()


def test_pt_compacts_partial_view(tmp_path: Path) -> None:
    big = torch.zeros(1000, 1000)
    size = save_state_dict({"row": big[0]}, tmp_path / "row.pt")
    assert size < 100_000


def test_safetensors_header_layout(tmp_path: Path) -> None:
    path = tmp_path / "layout.safetensors"
    save_state_dict({"half": torch.ones(3, dtype=torch.float16), "double": torch.ones(2, dtype=torch.float64)}, path)
    raw = path.read_bytes()
    (header_size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_size])
    assert header_size % 8 == 0
    assert header["double"]["data_offsets"] == [0, 16]
    assert header["half"]["data_offsets"] == [16, 22]
    assert len(raw) == 8 + header_size + 22


def test_safetensors_metadata_stored(tmp_path: Path) -> None:
    path = tmp_path / "meta.safetensors"
    save_state_dict({"w": torch.ones(2)}, path, metadata={"format": "pt", "source": "test"})
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "source": "test"}


def test_pt_metadata_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only be stored in safetensors"):
        save_state_dict({"w": torch.ones(2)}, tmp_path / "meta.pt", metadata={"a": "b"})
    assert not (tmp_path / "meta.pt").exists()


def test_existing_file_kept_without_force(tmp_path: Path) -> None:
    path = tmp_path / "out.pt"
    path.write_bytes(b"original")
    with pytest.raises(OutputExistsError, match="pass --force"):
        save_state_dict({"w": torch.ones(2)}, path)
    assert path.read_bytes() == b"original"


def test_force_replaces_file(tmp_path: Path) -> None:
    path = tmp_path / "out.pt"
    path.write_bytes(b"original")
    save_state_dict({"w": torch.ones(2)}, path, force=True)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))


def test_pt_bytes_deterministic(tmp_path: Path) -> None:
    tensors = {"w": torch.arange(6.0)}
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    save_state_dict(tensors, first / "model.pt")
    save_state_dict(tensors, second / "model.pt")
    assert (first / "model.pt").read_bytes() == (second / "model.pt").read_bytes()


def test_pt_archive_named_after_file(tmp_path: Path) -> None:
    save_state_dict({"w": torch.ones(2)}, tmp_path / "model.pt")
    with zipfile.ZipFile(tmp_path / "model.pt") as archive:
        assert "model/data.pkl" in archive.namelist()


def test_returns_file_size(tmp_path: Path) -> None:
    path = tmp_path / "out.safetensors"
    assert save_state_dict({"w": torch.ones(5)}, path) == path.stat().st_size


def test_unsupported_dtype_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(PrunedoctorError, match="no safetensors equivalent"):
        save_state_dict({"c": torch.ones(2, dtype=torch.complex128)}, tmp_path / "c.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file whose re-read bytes differ is never moved into place."""
    write_pt = pd_io._write_pt

    def write_altered(tensors, path):  # type: ignore[no-untyped-def]
        write_pt({key: value + 1 for key, value in tensors.items()}, path)

    monkeypatch.setattr(pd_io, "_write_pt", write_altered)
    with pytest.raises(PrunedoctorError, match="verification failed for w"):
        save_state_dict({"w": torch.ones(3)}, tmp_path / "out.pt")
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_rejected(tmp_path: Path) -> None:
    with pytest.raises(PrunedoctorError, match="does not exist"):
        save_state_dict({"w": torch.ones(1)}, tmp_path / "missing" / "out.pt")


def test_unknown_extension_rejected(tmp_path: Path) -> None:
    with pytest.raises(PrunedoctorError, match="unknown output extension"):
        save_state_dict({"w": torch.ones(1)}, tmp_path / "out.npz")


def test_explicit_format_overrides_extension(tmp_path: Path) -> None:
    path = tmp_path / "out.weights"
    save_state_dict({"w": torch.ones(1)}, path, format="safetensors")
    assert torch.equal(load_file(path)["w"], torch.ones(1))


def test_non_tensor_value_rejected(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        save_state_dict({"w": [1.0]}, tmp_path / "out.pt")  # type: ignore[dict-item]


def test_format_from_suffixes() -> None:
    assert format_from_path("a.PTH") == "pt"
    assert format_from_path("a.ckpt") == "pt"
    assert format_from_path("a.safetensors") == "safetensors"
