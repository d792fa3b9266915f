"""normalize: equivalence with prune.remove, idempotence, strict loading, safe writes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune as prune
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import make_tiny_vit
from prunedoctor.cli.app import app
from prunedoctor.errors import OutputExistsError, PrunedoctorError, ReparametrizationError
from prunedoctor.normalize import default_output_path, normalize_checkpoint

LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, weights_only=True)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(_bits(actual[key]), _bits(tensor)), key


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    density=st.floats(0.0, 1.0),
    output_format=st.sampled_from(["pt", "safetensors"]),
)
def test_normalize_equals_prune_remove(
    tmp_path_factory: pytest.TempPathFactory, seed: int, dtype: torch.dtype, density: float, output_format: str
) -> None:
    """normalize(file saved with active pruning) == state_dict after prune.remove on the live model."""
    model = make_tiny_vit(seed).to(dtype)
    generator = torch.Generator().manual_seed(seed)
    pruned = []
    for block in model.blocks:
        for name in LINEARS:
            module = block.get_submodule(name)
            mask = (torch.rand(module.weight.shape, generator=generator) < density).to(dtype)
            prune.custom_from_mask(module, "weight", mask)
            pruned.append(module)
    folder = tmp_path_factory.mktemp("prop")
    torch.save(model.state_dict(), folder / "pruned.pt")
    for module in pruned:
        prune.remove(module, "weight")

    result = normalize_checkpoint(folder / "pruned.pt", folder / f"out.{output_format}")
    _assert_same_tensors(_read(result.output), model.state_dict())


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    widths=st.lists(st.integers(1, 24), min_size=2, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    prune_bias=st.booleans(),
)
def test_random_shapes_equal_prune_remove(
    tmp_path_factory: pytest.TempPathFactory, seed: int, widths: list[int], dtype: torch.dtype, prune_bias: bool
) -> None:
    """The same property on stacks of Linear layers of random widths, with l1_unstructured and bias masks."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(widths[i], widths[i + 1]).to(dtype) for i in range(len(widths) - 1)]
    model = torch.nn.Sequential(*layers)
    pruned = []
    for layer in layers:
        prune.l1_unstructured(layer, "weight", amount=0.4)
        pruned.append((layer, "weight"))
        if prune_bias:
            prune.random_unstructured(layer, "bias", amount=0.5)
            pruned.append((layer, "bias"))
    folder = tmp_path_factory.mktemp("linear")
    torch.save(model.state_dict(), folder / "pruned.pt")
    for layer, name in pruned:
        prune.remove(layer, name)

    result = normalize_checkpoint(folder / "pruned.pt", folder / "out.safetensors")
    _assert_same_tensors(_read(result.output), model.state_dict())


def test_reparam_fixture_matches_twin(fixtures_dir: Path, tmp_path: Path) -> None:
    result = normalize_checkpoint(fixtures_dir / "vit_tiny_reparam.pt", tmp_path / "out.pt")
    expected = torch.load(fixtures_dir / "vit_tiny_normalized.pt", weights_only=True)
    written = _read(result.output)
    assert list(written) == list(expected)
    _assert_same_tensors(written, expected)


@pytest.mark.parametrize(
    "name", ["vit_tiny_reparam.safetensors", "vit_tiny_legacy.pth", "vit_tiny_dp_compiled.pt", "vit_tiny_dataparallel.pt"]
)
def test_every_variant_matches_twin(fixtures_dir: Path, tmp_path: Path, name: str) -> None:
    result = normalize_checkpoint(fixtures_dir / name, tmp_path / "out.safetensors")
    _assert_same_tensors(_read(result.output), torch.load(fixtures_dir / "vit_tiny_normalized.pt", weights_only=True))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_normalize_is_idempotent(fixtures_dir: Path, tmp_path: Path, suffix: str) -> None:
    once = normalize_checkpoint(fixtures_dir / "vit_tiny_reparam.pt", tmp_path / f"once{suffix}")
    twice = normalize_checkpoint(once.output, tmp_path / f"twice{suffix}")
    assert twice.merged == []
    _assert_same_tensors(_read(twice.output), _read(once.output))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_output_loads_strictly(fixtures_dir: Path, tmp_path: Path, suffix: str) -> None:
    result = normalize_checkpoint(fixtures_dir / "vit_tiny_train_container.pt", tmp_path / f"out{suffix}")
    make_tiny_vit().load_state_dict(_read(result.output), strict=True)


def test_fp16_keeps_dtype(fixtures_dir: Path, tmp_path: Path) -> None:
    result = normalize_checkpoint(fixtures_dir / "vit_tiny_fp16.pt", tmp_path / "out.pt")
    assert {tensor.dtype for tensor in _read(result.output).values()} == {torch.float16}


def test_default_output_beside_input(fixtures_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "model.pth"
    source.write_bytes((fixtures_dir / "vit_tiny_reparam.pt").read_bytes())
    result = normalize_checkpoint(source)
    assert result.output == tmp_path / "model.normalized.pth"
    assert result.output.is_file()


def test_default_output_names() -> None:
    assert default_output_path("a/b.ckpt", "safetensors") == Path("a/b.normalized.safetensors")
    assert default_output_path("a/b.tar", "pt") == Path("a/b.normalized.pt")


def test_input_never_modified(fixtures_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.pt"
    source.write_bytes((fixtures_dir / "vit_tiny_reparam.pt").read_bytes())
    before = _digest(source)
    normalize_checkpoint(source, tmp_path / "out.safetensors", masks_output=tmp_path / "masks.pt")
    assert _digest(source) == before


def test_input_as_output_rejected(fixtures_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.pt"
    source.write_bytes((fixtures_dir / "vit_tiny_reparam.pt").read_bytes())
    with pytest.raises(PrunedoctorError, match="is the input file"):
        normalize_checkpoint(source, source, force=True)


def test_existing_output_kept(fixtures_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.pt"
    output.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="pass --force"):
        normalize_checkpoint(fixtures_dir / "vit_tiny_reparam.pt", output)
    assert output.read_bytes() == b"keep me"


def test_existing_masks_output_checked_first(fixtures_dir: Path, tmp_path: Path) -> None:
    masks = tmp_path / "masks.pt"
    masks.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError):
        normalize_checkpoint(fixtures_dir / "vit_tiny_reparam.pt", tmp_path / "out.pt", masks_output=masks)
    assert not (tmp_path / "out.pt").exists()


def test_masks_written_under_keys(fixtures_dir: Path, tmp_path: Path) -> None:
    result = normalize_checkpoint(fixtures_dir / "vit_tiny_reparam.pt", tmp_path / "out.pt",
                                  masks_output=tmp_path / "masks.safetensors")
    source = torch.load(fixtures_dir / "vit_tiny_reparam.pt", weights_only=True)
    expected = {key: tensor for key, tensor in source.items() if key.endswith("_mask")}
    _assert_same_tensors(_read(tmp_path / "masks.safetensors"), expected)
    assert result.masks_bytes == (tmp_path / "masks.safetensors").stat().st_size


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("broken_orphan_mask.pt", "weight itself is missing"),
        ("broken_shape_mismatch.pt", r"has shape \(48, 96\)"),
    ],
)
def test_unmergeable_rejected(fixtures_dir: Path, tmp_path: Path, name: str, pattern: str) -> None:
    with pytest.raises(ReparametrizationError, match=pattern):
        normalize_checkpoint(fixtures_dir / name, tmp_path / "out.pt")
    assert list(tmp_path.iterdir()) == []


def test_nonbinary_mask_merged_and_listed(fixtures_dir: Path, tmp_path: Path) -> None:
    result = normalize_checkpoint(fixtures_dir / "broken_nonbinary_mask.pt", tmp_path / "out.pt")
    assert result.nonbinary_masks == ["blocks.0.mlp.fc1.weight_mask"]


def test_sidecar_masks_dropped(fixtures_dir: Path, tmp_path: Path) -> None:
    result = normalize_checkpoint(fixtures_dir / "vit_tiny_sidecar_revived.pt", tmp_path / "out.pt")
    assert result.masks == ["blocks.0.mlp.fc1.weight_mask"]
    assert "blocks.0.mlp.fc1.weight_mask" not in _read(result.output)


def test_nonfinite_tensor_listed(fixtures_dir: Path, tmp_path: Path) -> None:
    result = normalize_checkpoint(fixtures_dir / "broken_nan.pt", tmp_path / "out.pt")
    assert result.nonfinite == ["blocks.1.attn.proj.weight"]


def test_finite_checkpoint_lists_nothing(fixtures_dir: Path, tmp_path: Path) -> None:
    result = normalize_checkpoint(fixtures_dir / "vit_tiny_reparam.pt", tmp_path / "out.pt")
    assert result.nonfinite == []


def test_disagreeing_sidecar_listed(fixtures_dir: Path, tmp_path: Path) -> None:
    result = normalize_checkpoint(fixtures_dir / "vit_tiny_sidecar_revived.pt", tmp_path / "out.pt")
    assert result.disagreeing_masks == ["blocks.0.mlp.fc1.weight_mask"]


def test_agreeing_sidecar_not_listed(tmp_path: Path) -> None:
    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    torch.save({"fc.weight": weight, "fc.weight_mask": (weight != 0).float()}, tmp_path / "in.pt")
    result = normalize_checkpoint(tmp_path / "in.pt", tmp_path / "out.pt")
    assert result.disagreeing_masks == []


def test_cli_warns_nonfinite(runner: CliRunner, fixtures_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["normalize", str(fixtures_dir / "broken_nan.pt"), "-o", str(tmp_path / "out.pt"),
                                 "-q"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert "PD006: blocks.1.attn.proj.weight has NaN or infinite values" in " ".join(result.stderr.split())


def test_cli_warns_disagreeing_sidecar(runner: CliRunner, fixtures_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["normalize", str(fixtures_dir / "vit_tiny_sidecar_revived.pt"), "-o",
                                 str(tmp_path / "out.pt"), "-q"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    stderr = " ".join(result.stderr.split())
    assert "PD009: blocks.0.mlp.fc1.weight is nonzero at 2 entries" in stderr
    assert "keeps these unmasked values" in stderr


def test_tied_weights_to_safetensors(tmp_path: Path) -> None:
    shared = torch.randn(6, 4)
    torch.save({"embed.weight": shared, "head.weight": shared, "head.bias": torch.zeros(6)}, tmp_path / "tied.pt")
    result = normalize_checkpoint(tmp_path / "tied.pt", tmp_path / "tied.safetensors")
    written = _read(result.output)
    assert torch.equal(written["embed.weight"], written["head.weight"])


def test_cli_normalize_reports(runner: CliRunner, fixtures_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["normalize", str(fixtures_dir / "vit_tiny_dp_compiled.pt"), "-o", str(output)],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "10 _orig/_mask pairs" in result.stdout
    assert "32 tensors," in result.stdout
    assert "stripped 'module.' '_orig_mod.'" in result.stdout
    assert output.name in result.stdout
    assert result.stderr == ""


def test_cli_normalize_refuses_overwrite(runner: CliRunner, fixtures_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.pt"
    output.write_bytes(b"keep me")
    result = runner.invoke(app, ["normalize", str(fixtures_dir / "vit_tiny_reparam.pt"), "-o", str(output)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "--force" in result.stderr
    assert output.read_bytes() == b"keep me"


def test_cli_normalize_force(runner: CliRunner, fixtures_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.pt"
    output.write_bytes(b"old")
    result = runner.invoke(app, ["normalize", str(fixtures_dir / "vit_tiny_reparam.pt"), "-o", str(output), "--force",
                                 "--quiet"])
    assert result.exit_code == 0
    assert result.stdout == ""
    assert len(_read(output)) == 32


def test_cli_format_option(runner: CliRunner, fixtures_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.pt"
    source.write_bytes((fixtures_dir / "vit_tiny_reparam.pt").read_bytes())
    result = runner.invoke(app, ["normalize", str(source), "--format", "safetensors", "-q"])
    assert result.exit_code == 0
    assert (tmp_path / "in.normalized.safetensors").is_file()
