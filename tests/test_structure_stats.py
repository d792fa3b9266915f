"""The ViT structure report built from the analysis stats equals the one built from tensors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.nn.utils.prune as prune
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from timm.models.vision_transformer import VisionTransformer
from typer.testing import CliRunner

from prunedoctor import reparam
from prunedoctor.cli.app import app
from prunedoctor.cli.render import render_inspect
from prunedoctor.errors import PrunedoctorError, StructureError
from prunedoctor.inspection import Analysis, analyze_checkpoint, build_report
from prunedoctor.loading import Checkpoint, load_checkpoint
from prunedoctor.reparam import effective_state_dict, masks_of, measure_parameters, merge_pair
from prunedoctor.vit.arch import infer_architecture
from prunedoctor.vit.section import build_structure_report
from prunedoctor.vit.structure import build_vit_report, build_vit_report_from_stats, has_structure_stats

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURE_FILES = sorted(
    path.name
    for path in FIXTURES.iterdir()
    if path.suffix in (".pt", ".pth", ".safetensors") and path.name != "broken_truncated.pt"
)
# Fixtures whose structure report cannot be built: a missing fc2 weight, and a mask of another shape.
UNREPORTABLE = {"broken_orphan_mask.pt", "broken_shape_mismatch.pt"}

WIDTH, HEADS, HIDDEN, DEPTH = 24, 4, 48, 2
HEAD_DIM = WIDTH // HEADS
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _load(name: str) -> Checkpoint:
    return load_checkpoint(FIXTURES / name, unsafe_load=name == "vit_tiny_unsafe_globals.pt")


def _without_flags(analysis: Analysis) -> Analysis:
    """Return the analysis with its row and column flags dropped, so every consumer reads tensors."""
    stats = {
        name: dataclasses.replace(item, row_nonzero=None, col_nonzero=None) for name, item in analysis.stats.items()
    }
    return dataclasses.replace(analysis, stats=stats)


def _outcome(build: Any) -> Any:
    """Return the report that ``build()`` returns, or the type and message of the error it raises."""
    try:
        return json.dumps(build(), sort_keys=True)
    except PrunedoctorError as error:
        return (type(error).__name__, str(error))


def _render(report: dict[str, Any]) -> str:
    console = Console(width=120, record=True, color_system=None)
    render_inspect(report, console)
    return console.export_text()


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_fixture_structure_paths_agree(name: str) -> None:
    loaded = _load(name)
    stats = analyze_checkpoint(loaded).stats
    from_stats = _outcome(lambda: build_structure_report(loaded, stats=stats))
    from_tensors = _outcome(lambda: build_structure_report(loaded))
    assert from_stats == from_tensors


@pytest.mark.parametrize("name", sorted(set(FIXTURE_FILES) - UNREPORTABLE))
def test_fixture_uses_stats_path(name: str) -> None:
    loaded = _load(name)
    stats = analyze_checkpoint(loaded).stats
    arch = infer_architecture(loaded.state_dict, args=loaded.args, stats=stats)
    assert has_structure_stats(stats, arch)


@pytest.mark.parametrize("name", ["vit_half_pruned.pt", "vit_tiny_sidecar_revived.pt", "vit_state2_revived.pt"])
def test_inspect_report_unchanged(name: str) -> None:
    """The whole inspect report, JSON and text, is the same with and without the flags."""
    loaded = _load(name)
    analysis = analyze_checkpoint(loaded)
    from_stats = build_report(loaded, analysis=analysis)
    from_tensors = build_report(loaded, analysis=_without_flags(analysis))
    assert "vit" in from_stats
    assert json.dumps(from_stats, sort_keys=True) == json.dumps(from_tensors, sort_keys=True)
    assert _render(from_stats) == _render(from_tensors)


def test_inspect_json_command_unchanged() -> None:
    path = FIXTURES / "vit_half_pruned.pt"
    result = CliRunner().invoke(app, ["inspect", "--json", str(path)])
    loaded = load_checkpoint(path)
    expected = build_report(loaded, analysis=_without_flags(analyze_checkpoint(loaded)))
    assert result.exit_code == 0
    assert json.loads(result.stdout) == expected


def test_stats_path_reads_no_tensor_data() -> None:
    """With the stats, the report needs only shapes: meta tensors (no data) give the same report."""
    loaded = _load("vit_half_pruned.pt")
    stats = analyze_checkpoint(loaded).stats
    meta = {key: torch.empty(t.shape, dtype=t.dtype, device="meta") for key, t in loaded.state_dict.items()}
    shapes_only = dataclasses.replace(loaded, state_dict=meta)
    assert build_structure_report(shapes_only, stats=stats) == build_structure_report(loaded)


def test_wide_matrices_fall_back_to_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Matrices with more columns than a chunk get no flags, and the report is read from tensors."""
    loaded = _load("vit_half_pruned.pt")
    monkeypatch.setattr(reparam, "_CHUNK_ELEMENTS", 16)
    stats = analyze_checkpoint(loaded).stats
    assert stats["blocks.0.attn.qkv.weight"].row_nonzero is None
    assert not has_structure_stats(stats, infer_architecture(loaded.state_dict, args=loaded.args))
    assert build_structure_report(loaded, stats=stats) == build_structure_report(loaded)


def test_orphan_orig_block_weight_rejected(tmp_path: Path) -> None:
    """A block weight stored as ``_orig`` without its mask gives a StructureError, not a KeyError."""
    state = torch.load(FIXTURES / "vit_tiny_reparam.pt", weights_only=True)
    del state["blocks.1.mlp.fc2.weight_mask"]
    torch.save(state, tmp_path / "orphan.pt")
    loaded = load_checkpoint(tmp_path / "orphan.pt")
    with pytest.raises(StructureError, match="blocks.1.mlp.fc2.weight has no effective value"):
        build_structure_report(loaded, heads=4)


def test_orphan_orig_inspect_skips_section(tmp_path: Path) -> None:
    state = torch.load(FIXTURES / "vit_tiny_reparam.pt", weights_only=True)
    del state["blocks.1.mlp.fc2.weight_mask"]
    torch.save(state, tmp_path / "orphan.pt")
    result = CliRunner().invoke(app, ["inspect", "--json", str(tmp_path / "orphan.pt")])
    assert result.exit_code == 0
    assert "has no effective value" in json.loads(result.stdout)["skipped_sections"]["vit"]


def test_misshapen_sidecar_qkv_mask_ignored(tmp_path: Path) -> None:
    """Head inference skips a qkv sidecar mask of another shape instead of failing to broadcast it."""
    state = torch.load(FIXTURES / "vit_tiny_normalized.pt", weights_only=True)
    state["blocks.0.attn.qkv.weight_mask"] = torch.ones(3, 3)
    torch.save(state, tmp_path / "sidecar.pt")
    result = CliRunner().invoke(app, ["inspect", "--json", str(tmp_path / "sidecar.pt")])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["vit"]["heads"] == HEADS


def _tiny_vit(seed: int, dtype: torch.dtype) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=16, patch_size=8, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=HIDDEN / WIDTH,
        num_classes=5,
    )
    return model.to(dtype).eval()


def _unit_mask(
    layer: torch.nn.Linear, generator: torch.Generator, density: float, rows: set[int], columns: set[int]
) -> torch.Tensor:
    """Return a random unstructured mask of ``layer.weight`` with the given rows and columns zeroed."""
    mask = (torch.rand(layer.weight.shape, generator=generator) < density).to(layer.weight.dtype)
    mask[sorted(rows)] = 0
    mask[:, sorted(columns)] = 0
    return mask


def _head_rows(heads: set[int]) -> set[int]:
    return {part * WIDTH + head * HEAD_DIM + i for part in range(3) for head in heads for i in range(HEAD_DIM)}


def _head_columns(heads: set[int]) -> set[int]:
    return {head * HEAD_DIM + i for head in heads for i in range(HEAD_DIM)}


unit_sets = st.lists(st.sets(st.integers(0, HEADS - 1), max_size=HEADS), min_size=DEPTH, max_size=DEPTH)
neuron_sets = st.lists(st.sets(st.integers(0, HIDDEN - 1), max_size=12), min_size=DEPTH, max_size=DEPTH)


@st.composite
def pruned_vit_states(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    """Draw the state dict of a tiny timm ViT pruned unit by unit with torch.nn.utils.prune.

    Heads and neurons are pruned on both sides, on one side only
    (inconsistent units), or not at all, on top of a random unstructured
    mask. Some fc1 rows are zero in the weights themselves. The state is
    stored as orig/mask pairs, merged, or merged with the masks saved beside
    weights that were never masked (so only the sidecar masks prune them).
    """
    seed = draw(st.integers(0, 2**16))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    storage = draw(st.sampled_from(["pairs", "merged", "sidecar"]))
    density = draw(st.sampled_from([1.0, 0.8, 0.4]))
    pruned_heads, input_heads, output_heads = draw(unit_sets), draw(unit_sets), draw(unit_sets)
    pruned_neurons, input_neurons, output_neurons = draw(neuron_sets), draw(neuron_sets), draw(neuron_sets)
    zeroed_neurons = draw(neuron_sets)
    with_nan = draw(st.booleans())

    model = _tiny_vit(seed, dtype)
    generator = torch.Generator().manual_seed(seed)
    raw: dict[str, torch.Tensor] = {}
    for i, block in enumerate(model.blocks):
        with torch.no_grad():
            block.mlp.fc1.weight[sorted(zeroed_neurons[i])] = 0
            if with_nan:
                block.attn.proj.weight[0, i] = float("nan")
        layers = {
            "attn.qkv": (block.attn.qkv, _head_rows(pruned_heads[i] | input_heads[i]), set()),
            "attn.proj": (block.attn.proj, set(), _head_columns(pruned_heads[i] | output_heads[i])),
            "mlp.fc1": (block.mlp.fc1, pruned_neurons[i] | input_neurons[i], set()),
            "mlp.fc2": (block.mlp.fc2, set(), pruned_neurons[i] | output_neurons[i]),
        }
        for name, (layer, rows, columns) in layers.items():
            raw[f"blocks.{i}.{name}.weight"] = layer.weight.detach().clone()
            prune.custom_from_mask(layer, "weight", _unit_mask(layer, generator, density, rows, columns))
    state = dict(model.state_dict())
    if storage == "pairs":
        return state
    merged = effective_state_dict(state)
    if storage == "merged":
        return merged
    for name, mask in masks_of(state).items():
        merged[name] = raw[name]
        merged[name + "_mask"] = mask
    return merged


chunk_sizes = st.sampled_from([1 << 15, 97, HIDDEN])


@settings(max_examples=30, deadline=None)
@given(state=pruned_vit_states(), chunk=chunk_sizes)
def test_random_pruning_reports_agree(state: dict[str, torch.Tensor], chunk: int) -> None:
    arch = infer_architecture(state, heads=HEADS)
    with mock.patch.object(reparam, "_CHUNK_ELEMENTS", chunk):
        stats = measure_parameters(state)
    from_tensors = build_vit_report(effective_state_dict(state), masks_of(state), arch)
    assert has_structure_stats(stats, arch)
    assert build_vit_report_from_stats(stats, arch) == from_tensors


@settings(max_examples=30, deadline=None)
@given(state=pruned_vit_states(), chunk=chunk_sizes)
def test_random_pruning_heads_inferred_alike(state: dict[str, torch.Tensor], chunk: int) -> None:
    with mock.patch.object(reparam, "_CHUNK_ELEMENTS", chunk):
        stats = measure_parameters(state)
    from_stats = _outcome(lambda: dataclasses.asdict(infer_architecture(state, stats=stats)))
    from_tensors = _outcome(lambda: dataclasses.asdict(infer_architecture(state)))
    assert from_stats == from_tensors


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    dtype=st.sampled_from([*FLOAT_DTYPES, torch.float64]),
    storage=st.sampled_from(["pair", "sidecar", "plain"]),
    nan=st.booleans(),
    chunk=st.sampled_from([1 << 15, 64, 41]),
)
def test_flags_match_masked_value(
    seed: int, rows: int, cols: int, dtype: torch.dtype, storage: str, nan: bool, chunk: int
) -> None:
    """Row and column flags equal ``(value * mask != 0).any(dim)``, with NaN counted as nonzero."""
    generator = torch.Generator().manual_seed(seed)
    value = torch.randn(rows, cols, generator=generator).to(dtype)
    value[torch.rand(rows, cols, generator=generator) < 0.5] = 0
    mask = (torch.rand(rows, cols, generator=generator) < 0.6).to(dtype)
    mask[rows // 2] = 0
    if nan:
        value[0, cols - 1] = float("nan")
    state = {"w_orig": value, "w_mask": mask} if storage == "pair" else {"w": value}
    if storage == "sidecar":
        state["w_mask"] = mask
    masked = value if storage == "plain" else merge_pair(value, mask)
    with mock.patch.object(reparam, "_CHUNK_ELEMENTS", chunk):
        item = measure_parameters(state)["w"]
    assert item.row_nonzero is not None
    assert item.col_nonzero is not None
    assert torch.equal(item.row_nonzero, (masked != 0).any(dim=1))
    assert torch.equal(item.col_nonzero, (masked != 0).any(dim=0))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 12), cols=st.integers(1, 12), matrix=st.booleans())
def test_sidecar_masked_zeros_counted(seed: int, rows: int, cols: int, matrix: bool) -> None:
    """A plain tensor with a sidecar mask reports the zeros of ``value * mask`` beside its own zeros."""
    generator = torch.Generator().manual_seed(seed)
    shape = (rows, cols) if matrix else (rows * cols,)
    value = torch.randn(shape, generator=generator)
    mask = (torch.rand(shape, generator=generator) < 0.5).float()
    item = measure_parameters({"w": value, "w_mask": mask})["w"]
    assert item.masked_zeros == value.numel() - int(torch.count_nonzero(value * mask))
    assert item.zeros == value.numel() - int(torch.count_nonzero(value))


def test_flags_of_empty_matrix() -> None:
    item = measure_parameters({"w": torch.zeros(0, 5)})["w"]
    assert item.row_nonzero is not None
    assert item.row_nonzero.shape == (0,)
    assert item.col_nonzero is not None
    assert torch.equal(item.col_nonzero, torch.zeros(5, dtype=torch.bool))
