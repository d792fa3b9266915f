"""Activation criteria (l1, l2, saliency) and the calibration data that feeds them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from prunedoctor.errors import DataError
from prunedoctor.vit.arch import infer_architecture
from prunedoctor.vit.calibration import detect_dataset_kind, load_calibration_batches
from prunedoctor.vit.pruning import compute_activation_scores

HEADS, HEAD_DIM = 4, 6
CIFAR_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"


def tiny_model() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=HEADS, mlp_ratio=2.0,
                             num_classes=10)


def batches(count: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(3, 3, 16, 16, generator=generator), torch.randint(0, 10, (3,), generator=generator))
            for _ in range(count)]


def captured_outputs(model: VisionTransformer, data: list[tuple[torch.Tensor, torch.Tensor]],
                     module: torch.nn.Module) -> torch.Tensor:
    """Return ``module``'s outputs over all batches, concatenated, from a hook of the test's own."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach()))
    with torch.no_grad():
        for images, _ in data:
            model.eval()(images)
    handle.remove()
    return torch.cat(outputs).double()


def test_l1_head_scores_by_hand() -> None:
    model, data = tiny_model(), batches()
    scores = compute_activation_scores(model, data, "l1")
    out = captured_outputs(model, data, model.blocks[1].attn.qkv)
    per_head = out.reshape(out.shape[0], out.shape[1], 3, HEADS, HEAD_DIM).abs().mean(dim=(0, 1, 2, 4))
    assert torch.allclose(scores["blocks.1.attn"], per_head)


def test_l2_neuron_scores_before_activation() -> None:
    model, data = tiny_model(), batches()
    scores = compute_activation_scores(model, data, "l2")
    out = captured_outputs(model, data, model.blocks[0].mlp.fc1)
    expected = out.square().mean(dim=(0, 1)).sqrt()
    assert torch.allclose(scores["blocks.0.mlp"], expected)
    after_gelu = F.gelu(out).square().mean(dim=(0, 1)).sqrt()
    assert not torch.allclose(scores["blocks.0.mlp"], after_gelu)


def test_saliency_matches_autograd() -> None:
    model, data = tiny_model(), batches(1)
    scores = compute_activation_scores(model, data, "saliency")
    images, labels = data[0]
    kept: list[torch.Tensor] = []

    def keep(_m: torch.nn.Module, _i: object, out: torch.Tensor) -> None:
        out.retain_grad()
        kept.append(out)

    handle = model.blocks[0].attn.qkv.register_forward_hook(keep)
    model.eval()
    F.cross_entropy(model(images), labels).backward()
    handle.remove()
    act = kept[0]
    assert act.grad is not None
    taylor = (act * act.grad).detach().double().abs()
    expected = taylor.reshape(3, -1, 3, HEADS, HEAD_DIM).sum(dim=(0, 1, 2, 4))
    assert torch.allclose(scores["blocks.0.attn"], expected)


def test_scoring_leaves_model_as_found() -> None:
    model = tiny_model()
    model.train()
    model.head.weight.requires_grad_(False)
    compute_activation_scores(model, batches(1), "saliency")
    assert model.training
    assert not model.head.weight.requires_grad
    assert model.blocks[0].attn.qkv.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_score_keys_and_shapes() -> None:
    scores = compute_activation_scores(tiny_model(), batches(1), "l1")
    assert sorted(scores) == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    assert scores["blocks.0.attn"].shape == (HEADS,)
    assert scores["blocks.1.mlp"].shape == (48,)


def test_no_batches_rejected() -> None:
    with pytest.raises(DataError, match="no calibration batches"):
        compute_activation_scores(tiny_model(), [], "l1")


def test_weight_criterion_rejected() -> None:
    with pytest.raises(ValueError, match="'magnitude' is not an activation criterion"):
        compute_activation_scores(tiny_model(), batches(1), "magnitude")


def write_image_folder(root: Path, size: int = 8, classes: int = 3, per_class: int = 4, mode: str = "RGB") -> Path:
    """Write a real image-folder layout of PNG files with random pixels."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                channels = 3 if mode == "RGB" else 1
                pixels = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
                Image.fromarray(pixels.squeeze(), mode=mode).save(folder / f"{i:03d}.png")
    return root


def tiny_arch(**overrides: int):  # type: ignore[no-untyped-def]
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=1, num_heads=HEADS, mlp_ratio=2.0,
                              num_classes=overrides.get("num_classes", 10))
    return infer_architecture(model.state_dict(), heads=HEADS)


def test_image_folder_batches(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "images")
    data = load_calibration_batches(root, tiny_arch(), batches=2, batch_size=4)
    assert data.dataset == "image-folder"
    assert len(data.batches) == 2
    images, labels = data.batches[0]
    assert images.shape == (4, 3, 16, 16)
    assert data.resized_from == 8
    assert labels.tolist() == [0, 1, 2, 0]


def test_grayscale_images_rejected(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "gray", mode="L")
    with pytest.raises(DataError, match="images have 1 channel but the model takes 3"):
        load_calibration_batches(root, tiny_arch(), batches=1, batch_size=2)


def test_labels_beyond_classifier_rejected(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "many", classes=3)
    with pytest.raises(DataError, match="label 2 is outside the classifier's 2 classes"):
        load_calibration_batches(root, tiny_arch(num_classes=2), batches=1, batch_size=6)


def test_missing_data_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="calibration data not found"):
        load_calibration_batches(tmp_path / "nowhere", tiny_arch(), batches=1, batch_size=2)


def test_cifar_folder_detected(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    assert detect_dataset_kind(tmp_path) == "cifar10"
    assert detect_dataset_kind(tmp_path / "cifar-10-batches-py") == "image-folder"


@pytest.mark.skipif(not CIFAR_ARCHIVE.is_file(), reason=f"real CIFAR-10 archive not found at {CIFAR_ARCHIVE}")
def test_saliency_on_real_cifar() -> None:
    """Saliency on real CIFAR-10 images gives finite, positive scores for every unit."""
    model = tiny_model()
    arch = infer_architecture(model.state_dict(), heads=HEADS)
    data = load_calibration_batches(CIFAR_ARCHIVE, arch, batches=2, batch_size=8)
    assert data.resized_from == 32
    scores = compute_activation_scores(model, data.batches, "saliency")
    assert all(bool(torch.isfinite(s).all()) for s in scores.values())
    assert all(bool((s > 0).all()) for s in scores.values())
