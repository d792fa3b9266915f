"""Bad input: every command exits 2 with one stderr line, no traceback, no output and no side effect."""

from __future__ import annotations

import pickle
import random
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from prunedoctor.cli.app import app

SENTINEL_NAME = "pwned.txt"


class CreatesFile:
    """Unpickling this object calls ``open(path, "w")``: the kind of global a malicious checkpoint uses."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return (open, (self.path, "w"))


def _payload(folder: Path) -> dict[str, object]:
    return {"weight": torch.ones(2), "hook": CreatesFile(str(folder / SENTINEL_NAME))}


def _empty(folder: Path) -> Path:
    path = folder / "empty.pt"
    path.touch()
    return path


def _random_bytes(folder: Path) -> Path:
    path = folder / "random.pth"
    path.write_bytes(b"\x13" + random.Random(7).randbytes(4095))
    return path


def _text_file(folder: Path) -> Path:
    path = folder / "notes.ckpt"
    path.write_text("epoch 3: loss 0.41, accuracy 87 %\n", encoding="utf-8")
    return path


def _truncated_zip(folder: Path) -> Path:
    whole = folder / "whole.pt"
    torch.save({"weight": torch.randn(64, 64)}, whole)
    path = folder / "truncated.pt"
    path.write_bytes(whole.read_bytes()[:3000])
    whole.unlink()
    return path


def _truncated_safetensors(folder: Path) -> Path:
    header = b'{"w":{"dtype":"F32","shape":[64],"data_offsets":[0,256]}}'
    path = folder / "truncated.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 100)
    return path


def _image_named_safetensors(folder: Path) -> Path:
    path = folder / "photo.safetensors"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    return path


def _plain_zip_named_pth(folder: Path) -> Path:
    path = folder / "archive.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")
    return path


def _malicious_zip(folder: Path) -> Path:
    path = folder / "malicious.pt"
    torch.save(_payload(folder), path)
    return path


def _malicious_legacy(folder: Path) -> Path:
    path = folder / "malicious_legacy.pt"
    torch.save(_payload(folder), path, _use_new_zipfile_serialization=False)
    return path


def _malicious_raw_pickle(folder: Path) -> Path:
    path = folder / "malicious.bin"
    path.write_bytes(pickle.dumps(_payload(folder), protocol=4))
    return path


def _directory(folder: Path) -> Path:
    path = folder / "checkpoint.pt"
    path.mkdir()
    return path


def _missing(folder: Path) -> Path:
    return folder / "missing.pt"


CORPUS: dict[str, Callable[[Path], Path]] = {
    "empty file": _empty,
    "random bytes": _random_bytes,
    "text file": _text_file,
    "truncated zip": _truncated_zip,
    "truncated safetensors": _truncated_safetensors,
    "image with checkpoint extension": _image_named_safetensors,
    "zip that is not torch": _plain_zip_named_pth,
    "pickle global creates file (zip)": _malicious_zip,
    "pickle global creates file (legacy)": _malicious_legacy,
    "pickle global creates file (raw pickle)": _malicious_raw_pickle,
    "directory": _directory,
    "missing file": _missing,
}

COMMANDS = {
    "inspect": lambda path, out: ["inspect", str(path)],
    "inspect --json": lambda path, out: ["inspect", "--json", str(path)],
    "normalize": lambda path, out: ["normalize", str(path), "-o", str(out / "normalized.pt"),
                                    "--masks-out", str(out / "masks.pt")],
    "check": lambda path, out: ["check", "--no-config", str(path)],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", list(CORPUS))
def test_bad_input_exits_cleanly(runner: CliRunner, tmp_path: Path, case: str, command: str) -> None:
    inputs = tmp_path / "inputs"
    outputs = tmp_path / "outputs"
    inputs.mkdir()
    outputs.mkdir()
    path = CORPUS[case](inputs)

    result = runner.invoke(app, COMMANDS[command](path, outputs))

    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("prunedoctor: error: ")
    assert result.stderr.count("\n") == 1
    assert path.name in result.stderr
    assert "Traceback" not in result.output
    assert list(outputs.iterdir()) == []
    assert not (inputs / SENTINEL_NAME).exists()


def test_shape_mismatch_normalize_exits_2(runner: CliRunner, fixtures_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.pt"
    result = runner.invoke(app, ["normalize", str(fixtures_dir / "broken_shape_mismatch.pt"), "-o", str(output)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "blocks.0.mlp.fc1.weight_mask has shape (48, 96)" in result.stderr
    assert not output.exists()


def test_orphan_mask_normalize_exits_2(runner: CliRunner, fixtures_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["normalize", str(fixtures_dir / "broken_orphan_mask.pt"), "-o", str(tmp_path / "o.pt")])
    assert result.exit_code == 2
    assert "blocks.1.mlp.fc2.weight_mask has no blocks.1.mlp.fc2.weight_orig" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_refused_pickle_lists_global(runner: CliRunner, tmp_path: Path) -> None:
    path = _malicious_zip(tmp_path)
    result = runner.invoke(app, ["inspect", str(path)])
    assert "--unsafe-load" in result.stderr
    assert "open" in result.stderr


def test_malicious_pickle_is_live(tmp_path: Path) -> None:
    """Control: the corpus pickle really creates the sentinel when unpickled without restrictions."""
    path = _malicious_raw_pickle(tmp_path)
    with path.open("rb") as handle:
        loaded = pickle.load(handle)  # noqa: S301 - the point of this control test
    loaded["hook"].close()
    assert (tmp_path / SENTINEL_NAME).exists()



def test_torch_file_named_safetensors_loads(runner: CliRunner, fixtures_dir: Path, tmp_path: Path) -> None:
    """torch 2.14's torch.load sends '.safetensors' paths to safetensors; the loader must not."""
    renamed = tmp_path / "renamed.safetensors"
    renamed.write_bytes((fixtures_dir / "vit_tiny_reparam.pt").read_bytes())
    result = runner.invoke(app, ["inspect", str(renamed), "--json"])
    assert result.exit_code == 0
    assert '"format": "torch-zip"' in result.stdout


def test_normalize_pt_named_safetensors(fixtures_dir: Path, tmp_path: Path) -> None:
    from prunedoctor.normalize import normalize_checkpoint

    output = tmp_path / "out.safetensors"
    normalize_checkpoint(fixtures_dir / "vit_tiny_reparam.pt", output, format="pt")
    assert output.read_bytes()[:4] == b"PK\x03\x04"
