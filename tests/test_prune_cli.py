"""The ``prunedoctor prune`` command end to end, through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as prune
from PIL import Image
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from typer.testing import CliRunner

from prunedoctor.cli.app import app
from prunedoctor.reparam import effective_state_dict

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
WIDTH, HEADS, HEAD_DIM = 24, 4, 6


def golden_checkpoint(path: Path, *, reparam: bool = True) -> Path:
    """Save a tiny timm ViT whose head and neuron magnitudes are set by hand.

    The qkv scales of the heads are 4, 1, 3, 2 in block 0 and 1, 3, 2, 4 in
    block 1, where a mask prunes head 3. Keeping two heads per block by
    magnitude therefore keeps heads 0 and 2 of block 0 and heads 1 and 2 of
    block 1. Neuron n of each block has fc1 scale n + 1, so the last is the strongest.
    """
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=WIDTH, depth=2, num_heads=HEADS, mlp_ratio=2.0,
                              num_classes=10)
    scales = [[4, 1, 3, 2], [1, 3, 2, 4]]
    with torch.no_grad():
        for b, block in enumerate(model.blocks):
            qkv = block.attn.qkv.weight
            qkv.copy_(qkv.abs().mean() * torch.ones_like(qkv))
            for h, scale in enumerate(scales[b]):
                for part in range(3):
                    qkv[part * WIDTH + h * HEAD_DIM : part * WIDTH + (h + 1) * HEAD_DIM] *= scale
            fc1 = block.mlp.fc1.weight
            fc1.copy_(torch.arange(1, fc1.shape[0] + 1, dtype=torch.float32)[:, None].expand_as(fc1) * 0.01)
    mask = torch.ones(3 * WIDTH, WIDTH)
    for part in range(3):
        mask[part * WIDTH + 3 * HEAD_DIM : part * WIDTH + 4 * HEAD_DIM] = 0
    prune.custom_from_mask(model.blocks[1].attn.qkv, "weight", mask)
    proj_mask = torch.ones(WIDTH, WIDTH)
    proj_mask[:, 3 * HEAD_DIM :] = 0
    prune.custom_from_mask(model.blocks[1].attn.proj, "weight", proj_mask)
    sd = model.state_dict()
    torch.save(sd if reparam else effective_state_dict(sd), path)
    return path


def invoke(*args: str | Path) -> Any:
    return CliRunner().invoke(app, ["prune", *map(str, args)])


def report_of(result: Any) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_magnitude_golden_heads(tmp_path: Path) -> None:
    ckpt = golden_checkpoint(tmp_path / "in.pt")
    report = report_of(invoke(ckpt, "-o", tmp_path / "out.pt", "--head-ratio", "0.5", "--heads", "4", "--json"))
    assert [b["heads"]["kept"] for b in report["blocks"]] == [[0, 2], [1, 2]]
    assert [b["heads"]["pruned"] for b in report["blocks"]] == [[1, 3], [0, 3]]
    assert report["config"]["target"] == "head"


def test_global_golden_neurons(tmp_path: Path) -> None:
    ckpt = golden_checkpoint(tmp_path / "in.pt")
    report = report_of(invoke(ckpt, "-o", tmp_path / "out.pt", "--mlp-ratio", "0.75", "--sorting", "global",
                              "--heads", "4", "--json"))
    assert report["blocks"][0]["neurons"]["pruned_indices"] == list(range(36))
    assert report["blocks"][1]["neurons"]["kept"] == 12
    assert report["normalization"].startswith("per-layer mean")


def test_reparam_output_keys(tmp_path: Path) -> None:
    ckpt = golden_checkpoint(tmp_path / "in.pt")
    out = tmp_path / "out.pt"
    report_of(invoke(ckpt, "-o", out, "--head-ratio", "0.5", "--mlp-ratio", "0.5", "--heads", "4", "--json"))
    sd = torch.load(out, weights_only=True)
    for b in range(2):
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            assert f"blocks.{b}.{layer}.weight_orig" in sd
            assert f"blocks.{b}.{layer}.weight_mask" in sd
            assert f"blocks.{b}.{layer}.weight" not in sd


def test_output_loads_into_pruned_timm_model(tmp_path: Path) -> None:
    """The reparam output loads strictly into a timm ViT pruned with identity masks."""
    ckpt = golden_checkpoint(tmp_path / "in.pt")
    out = tmp_path / "out.pt"
    report_of(invoke(ckpt, "-o", out, "--head-ratio", "0.5", "--mlp-ratio", "0.5", "--heads", "4", "--json"))
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=WIDTH, depth=2, num_heads=HEADS, mlp_ratio=2.0,
                              num_classes=10)
    for block in model.blocks:
        for module in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            prune.identity(module, "weight")
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    model.eval()(torch.zeros(1, 3, 16, 16))  # the forward pre-hook recomputes weight = orig * mask
    assert int((model.blocks[0].attn.qkv.weight.reshape(3, HEADS, HEAD_DIM, WIDTH)[:, 1] != 0).sum()) == 0


def test_twin_inputs_give_same_output(tmp_path: Path) -> None:
    reparam = golden_checkpoint(tmp_path / "reparam.pt")
    normalized = golden_checkpoint(tmp_path / "normalized.pt", reparam=False)
    options = ["--head-ratio", "0.5", "--mlp-ratio", "0.25", "--sorting", "global", "--heads", "4", "--json"]
    first = report_of(invoke(reparam, "-o", tmp_path / "a.pt", *options))
    second = report_of(invoke(normalized, "-o", tmp_path / "b.pt", *options))
    assert first["blocks"] == second["blocks"]
    a, b = torch.load(tmp_path / "a.pt", weights_only=True), torch.load(tmp_path / "b.pt", weights_only=True)
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_normalized_output_with_masks(tmp_path: Path) -> None:
    ckpt = golden_checkpoint(tmp_path / "in.pt")
    out, masks_out = tmp_path / "out.safetensors", tmp_path / "masks.pt"
    report_of(invoke(ckpt, "-o", out, "--as", "normalized", "--masks-out", masks_out, "--head-ratio", "0.5",
                     "--mlp-ratio", "0.5", "--heads", "4", "--json"))
    weights, masks = load_file(str(out)), torch.load(masks_out, weights_only=True)
    assert not [k for k in weights if k.endswith(("_mask", "_orig"))]
    assert sorted(masks) == sorted(f"blocks.{b}.{layer}.weight_mask" for b in range(2)
                                   for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    qkv = weights["blocks.0.attn.qkv.weight"]
    assert bool((qkv[masks["blocks.0.attn.qkv.weight_mask"] == 0] == 0).all())


def test_refill_end_to_end(tmp_path: Path) -> None:
    report = report_of(invoke(FIXTURES / "vit_state1.pt", "-o", tmp_path / "out.pt", "--refill", "--rate", "0.5",
                              "--json"))
    assert report["refill"]["unstructured_sparsity"] > report["sparsity"]["before"]
    assert report["config"]["target"] == "both"
    assert all(b["heads"]["budget"] is not None for b in report["blocks"])


def test_l1_with_image_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(2):
            folder = tmp_path / "images" / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(5):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    report = report_of(invoke(FIXTURES / "vit_head_pruned.pt", "-o", tmp_path / "out.pt", "--criterion", "l1",
                              "--head-ratio", "0.5", "--data", tmp_path / "images", "--calib-batches", "2",
                              "--batch-size", "4", "--json"))
    assert report["calibration"]["images"] == 8
    assert report["calibration"]["dataset"] == "image-folder"
    # Block 1 heads 0 and 2 are pruned in the input, so l1 must keep the two live ones.
    assert report["blocks"][1]["heads"]["kept"] == [1, 3]


def test_text_report_explains_numbers(tmp_path: Path) -> None:
    result = invoke(FIXTURES / "vit_state1.pt", "-o", tmp_path / "out.pt", "--head-ratio", "0.5",
                    "--sorting", "global")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "Kept and pruned units per block" in text
    assert "score normalisation: per-layer mean" in text
    assert "of the qkv, proj, fc1 and fc2 weights" in text
    assert "Kept units get masks of ones on both sides" in text


def test_quiet_prints_nothing(tmp_path: Path) -> None:
    result = invoke(FIXTURES / "vit_state1.pt", "-o", tmp_path / "out.pt", "--head-ratio", "0.5", "--quiet")
    assert result.exit_code == 0
    assert result.stdout == ""
    assert (tmp_path / "out.pt").is_file()


def assert_usage_error(result: Any, message: str) -> None:
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("prunedoctor: error: ")
    assert message in lines[0]
    assert "Traceback" not in result.output


def test_existing_output_kept(tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    out.write_bytes(b"precious")
    result = invoke(FIXTURES / "vit_state1.pt", "-o", out, "--head-ratio", "0.5")
    assert_usage_error(result, "file exists; pass --force")
    assert out.read_bytes() == b"precious"


def test_force_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    out.write_bytes(b"old")
    assert invoke(FIXTURES / "vit_state1.pt", "-o", out, "--head-ratio", "0.5", "--force", "-q").exit_code == 0
    assert "blocks.0.attn.qkv.weight_mask" in torch.load(out, weights_only=True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ([], "no budget given"),
        (["--refill", "--head-ratio", "0.5"], "--refill sets the budget"),
        (["--target", "head", "--mlp-ratio", "0.5"], "--target head prunes heads: pass --head-ratio"),
        (["--criterion", "l1", "--head-ratio", "0.5"], "--criterion l1 runs the model on calibration images"),
        (["--head-ratio", "0.5", "--data", "somewhere"], "--data is used by the l1, l2 and saliency criteria only"),
    ],
)
def test_contradictory_options_rejected(tmp_path: Path, options: list[str], message: str) -> None:
    result = invoke(FIXTURES / "vit_state1.pt", "-o", tmp_path / "out.pt", *options)
    assert_usage_error(result, message)
    assert not (tmp_path / "out.pt").exists()


def test_missing_checkpoint_rejected(tmp_path: Path) -> None:
    assert_usage_error(invoke(tmp_path / "none.pt", "-o", tmp_path / "out.pt", "--head-ratio", "0.5"),
                       "file not found")


def test_non_vit_checkpoint_rejected(tmp_path: Path) -> None:
    ckpt = tmp_path / "cnn.pt"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(10, 4)}, ckpt)
    result = invoke(ckpt, "-o", tmp_path / "out.pt", "--head-ratio", "0.5")
    assert_usage_error(result, "not a timm ViT state dict")
    assert not (tmp_path / "out.pt").exists()


def test_ratio_out_of_range_rejected(tmp_path: Path) -> None:
    result = invoke(FIXTURES / "vit_state1.pt", "-o", tmp_path / "out.pt", "--head-ratio", "1.5")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
