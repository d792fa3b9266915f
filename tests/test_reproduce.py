"""``prunedoctor reproduce`` end to end on real CIFAR-10, and the mask helpers it relies on."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.nn.utils import prune
from typer.testing import CliRunner

from prunedoctor.cli.app import app
from prunedoctor.reparam import validate_reparametrization
from prunedoctor.train.masking import (
    apply_masks,
    current_masks,
    effective_weights,
    hash_masks,
    is_subset_mask,
    remaining_fraction,
    reset_to_rewind_point,
    snapshot_weights,
)
from prunedoctor.train.presets import build_model

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
needs_cifar = pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"real CIFAR-10 archive not found at {ARCHIVE}")

runner = CliRunner()
RATE = 0.3
ITERS = 3
EPOCHS = 2


def _tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("vit-micro", num_classes=10, img_size=32, in_chans=3)


def _qkv_mask(model: torch.nn.Module, kept_rows: int) -> dict[str, torch.Tensor]:
    weight = model.blocks[0].attn.qkv.weight
    mask = torch.zeros_like(weight)
    mask[:kept_rows] = 1
    return {"blocks.0.attn.qkv.weight": mask}


# --- mask helpers on a real timm ViT ---------------------------------------------


def test_apply_masks_uses_prune_reparametrization() -> None:
    """Applied masks become weight_orig/weight_mask with prune's forward pre-hook."""
    model = _tiny_vit()
    apply_masks(model, _qkv_mask(model, 10))
    qkv = model.blocks[0].attn.qkv
    assert prune.is_pruned(model)
    assert hasattr(qkv, "weight_orig")
    assert int(qkv.weight_mask.sum()) == 10 * qkv.weight_orig.shape[1]
    assert bool((qkv.weight[10:] == 0).all())


def test_apply_masks_replaces_previous_mask() -> None:
    """A second mask replaces the first instead of multiplying with it."""
    model = _tiny_vit()
    apply_masks(model, _qkv_mask(model, 10))
    wider = {"blocks.0.attn.qkv.weight": torch.ones_like(model.blocks[0].attn.qkv.weight_orig)}
    apply_masks(model, wider)
    assert float(model.blocks[0].attn.qkv.weight_mask.min()) == 1.0


def test_snapshot_shares_no_storage() -> None:
    """In-place updates of the live parameters after a snapshot do not reach the snapshot."""
    model = _tiny_vit()
    apply_masks(model, _qkv_mask(model, 30))
    snapshot = snapshot_weights(model)
    before = {name: tensor.clone() for name, tensor in snapshot.items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    for name, tensor in snapshot.items():
        assert torch.equal(tensor, before[name]), f"{name} changed with the live model"


def test_reset_restores_rewind_times_mask() -> None:
    """After a reset the effective weights are the rewind point times the new mask."""
    model = _tiny_vit()
    rewind = snapshot_weights(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    masks = _qkv_mask(model, 20)
    reset_to_rewind_point(model, rewind, masks)
    weights = effective_weights(model)
    name = "blocks.0.attn.qkv.weight"
    assert torch.equal(weights[name], rewind[name] * masks[name])
    assert torch.equal(weights["head.weight"], rewind["head.weight"])


def test_current_masks_round_trip() -> None:
    """current_masks returns the masks that apply_masks applied."""
    model = _tiny_vit()
    masks = _qkv_mask(model, 12)
    apply_masks(model, masks)
    assert hash_masks(current_masks(model)) == hash_masks(masks)


def test_remaining_fraction_counts_nonzero() -> None:
    masks = {"a": torch.tensor([1.0, 0.0, 1.0, 1.0]), "b": torch.zeros(4)}
    assert remaining_fraction(masks) == pytest.approx(3 / 8)


def test_subset_mask_detects_revival() -> None:
    outer = {"a": torch.tensor([1.0, 0.0])}
    assert is_subset_mask({"a": torch.tensor([1.0, 0.0])}, outer)
    assert not is_subset_mask({"a": torch.tensor([0.0, 1.0])}, outer)


# --- the command end to end ----------------------------------------------------------


def run_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """Call ``build(folder)`` once per test session and return the folder.

    Under pytest-xdist, every worker would run a module fixture again, so the
    workers share one folder: the first builds it under a file lock and the
    others reuse it.
    """
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (folder / ".done").exists():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
                build(folder)
                (folder / ".done").touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return folder


def _build_smoke(folder: Path) -> None:
    result = runner.invoke(
        app,
        [
            "reproduce", "--dataset", "image-folder", "--data-dir", str(ARCHIVE), "--model", "vit-micro",
            "--subset", "2000", "--val-size", "500", "--batch-size", "50", "--epochs", str(EPOCHS),
            "--iters", str(ITERS), "--rate", str(RATE), "--lr", "0.1", "--device", "cpu",
            "--out", str(folder / "run"),
        ],
    )
    assert result.exit_code == 0, result.output
    (folder / "output.txt").write_text(result.output)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    if not ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 archive not found at {ARCHIVE}")
    folder = run_once(tmp_path_factory, "reproduce-smoke", _build_smoke)
    return folder / "run", (folder / "output.txt").read_text()


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _history(run_dir: Path) -> dict:
    return json.loads((run_dir / "history.json").read_text())


@needs_cifar
@pytest.mark.slow
def test_smoke_writes_every_state(smoke_run: tuple[Path, str]) -> None:
    """Each state folder has weights, masks, rewind point, configuration and random states."""
    run_dir, _ = smoke_run
    for state in range(ITERS):
        for name in ("model.pt", "masks.pt", "rewind.pt", "config.json", "rng.pt", "record.json"):
            assert (run_dir / f"state_{state}" / name).is_file(), f"state_{state}/{name} missing"
    for name in ("history.json", "history.csv", "summary.md", "log.txt", "resume.pt"):
        assert (run_dir / name).is_file(), f"{name} missing"
    assert (run_dir / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_cifar
@pytest.mark.slow
def test_smoke_history_has_every_epoch(smoke_run: tuple[Path, str]) -> None:
    run_dir, _ = smoke_run
    rows = (run_dir / "history.csv").read_text().strip().splitlines()
    assert rows[0].startswith("state,epoch,train_loss")
    assert len(rows) == 1 + ITERS * EPOCHS
    assert len(_history(run_dir)["states"]) == ITERS


@needs_cifar
@pytest.mark.slow
def test_smoke_sparsity_compounds(smoke_run: tuple[Path, str]) -> None:
    """Remaining weights follow (1 - rate)^k, less what whole units round away."""
    run_dir, _ = smoke_run
    remaining = [s["remaining"] for s in _history(run_dir)["states"]]
    assert remaining[0] == 1.0
    for state in range(1, ITERS):
        expected = (1 - RATE) ** state
        assert remaining[state] <= expected + 1e-9, f"state {state}: {remaining[state]} > {expected}"
        assert remaining[state] >= expected - 0.06, f"state {state}: {remaining[state]} far below {expected}"


@needs_cifar
@pytest.mark.slow
def test_smoke_masks_never_revive(smoke_run: tuple[Path, str]) -> None:
    run_dir, _ = smoke_run
    for state in range(1, ITERS):
        previous = _load(run_dir / f"state_{state - 1}" / "masks.pt")
        current = _load(run_dir / f"state_{state}" / "masks.pt")
        assert is_subset_mask(current, previous), f"state {state} revives weights of state {state - 1}"
        assert remaining_fraction(current) < remaining_fraction(previous), f"state {state} prunes nothing"


@needs_cifar
@pytest.mark.slow
def test_smoke_masks_file_matches_record(smoke_run: tuple[Path, str]) -> None:
    """state_K/masks.pt contains the masks that state K trained with, as history.json records them."""
    run_dir, _ = smoke_run
    records = _history(run_dir)["states"]
    for state in range(ITERS):
        masks = _load(run_dir / f"state_{state}" / "masks.pt")
        assert hash_masks(masks) == records[state]["masks_sha256"], f"state_{state}/masks.pt"
        assert remaining_fraction(masks) == pytest.approx(records[state]["remaining"])


@needs_cifar
@pytest.mark.slow
def test_smoke_masks_prune_whole_heads(smoke_run: tuple[Path, str]) -> None:
    """Every qkv row and fc1 row of a pruned state is entirely kept or entirely removed."""
    run_dir, _ = smoke_run
    masks = _load(run_dir / f"state_{ITERS - 1}" / "masks.pt")
    for name, mask in masks.items():
        if name.endswith(("attn.qkv.weight", "mlp.fc1.weight")):
            row_sums = mask.sum(dim=1)
            assert bool(((row_sums == 0) | (row_sums == mask.shape[1])).all()), f"{name} has partial rows"


@needs_cifar
@pytest.mark.slow
def test_smoke_checkpoint_is_normalized(smoke_run: tuple[Path, str]) -> None:
    """Every model.pt has plain timm names, loads into the ViT, and respects its masks."""
    run_dir, _ = smoke_run
    model = build_model("vit-micro", num_classes=10, img_size=32, in_chans=3)
    for state in range(ITERS):
        weights = _load(run_dir / f"state_{state}" / "model.pt")
        masks = _load(run_dir / f"state_{state}" / "masks.pt")
        assert not [k for k in weights if k.endswith(("_orig", "_mask"))]
        model.load_state_dict(weights, strict=True)
        with_masks = dict(weights)
        with_masks.update({f"{name}_mask": mask for name, mask in masks.items()})
        findings = validate_reparametrization(with_masks)
        assert [f.key for f in findings if f.code == "PD009"] == [], f"state {state}"


@needs_cifar
@pytest.mark.slow
def test_smoke_checkpoint_has_trained_weights(smoke_run: tuple[Path, str]) -> None:
    """model.pt is written before the reset: its unpruned tensors differ from the rewind point."""
    run_dir, _ = smoke_run
    for state in range(ITERS):
        weights = _load(run_dir / f"state_{state}" / "model.pt")
        rewind = _load(run_dir / f"state_{state}" / "rewind.pt")
        for key in ("head.weight", "blocks.0.norm1.weight", "patch_embed.proj.weight"):
            assert not torch.equal(weights[key], rewind[key]), f"state_{state}/model.pt {key} is the rewind point"


@needs_cifar
@pytest.mark.slow
def test_smoke_rewind_point_is_stable(smoke_run: tuple[Path, str]) -> None:
    """Every state restarts from the same rewind point: later training never changed it."""
    run_dir, _ = smoke_run
    first = _load(run_dir / "state_0" / "rewind.pt")
    last = _load(run_dir / f"state_{ITERS - 1}" / "rewind.pt")
    assert first.keys() == last.keys()
    for key in first:
        assert torch.equal(first[key], last[key]), key


@needs_cifar
@pytest.mark.slow
def test_smoke_states_pass_check(smoke_run: tuple[Path, str]) -> None:
    """Every state passes ``prunedoctor check`` with the structure rules and --against the state before."""
    run_dir, _ = smoke_run
    for state in range(1, ITERS):
        current = run_dir / f"state_{state}" / "model.pt"
        previous = run_dir / f"state_{state - 1}" / "model.pt"
        result = runner.invoke(
            app, ["check", str(current), "--against", str(previous), "--heads", "3", "--min-heads", "1", "--no-config"]
        )
        assert result.exit_code == 0, f"state {state}: {result.output}"


@needs_cifar
@pytest.mark.slow
def test_smoke_learns_above_chance(smoke_run: tuple[Path, str]) -> None:
    """Two epochs on 2,000 real images lift validation accuracy clearly above 10 %."""
    run_dir, _ = smoke_run
    best = max(e["val_accuracy"] for e in _history(run_dir)["epochs"] if e["state"] == 0)
    assert best > 0.2


@needs_cifar
@pytest.mark.slow
def test_smoke_output_has_table(smoke_run: tuple[Path, str]) -> None:
    _, output = smoke_run
    assert "remaining" in output
    assert "state 2 done" in output
    assert "Traceback" not in output


@needs_cifar
@pytest.mark.slow
def test_smoke_output_counts_every_file(smoke_run: tuple[Path, str]) -> None:
    """The closing line counts every file in the run folder, not a subset."""
    run_dir, output = smoke_run
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    megabytes = sum(path.stat().st_size for path in files) / 1e6
    assert f"Wrote {len(files)} files ({megabytes:.2f} MB) to" in " ".join(output.split())


@needs_cifar
@pytest.mark.slow
def test_smoke_header_counts_states(smoke_run: tuple[Path, str]) -> None:
    _, output = smoke_run
    assert f"{ITERS} states x {EPOCHS} epochs" in output


def test_lr_format_keeps_small_rates() -> None:
    from prunedoctor.cli.reproduce_cmd import format_lr

    assert format_lr(3.1e-05) == "3.1e-05"


def test_lr_format_keeps_usual_rates() -> None:
    from prunedoctor.cli.reproduce_cmd import format_lr

    assert format_lr(0.1) == "0.1"


@needs_cifar
@pytest.mark.slow
def test_resume_finished_run_loads_no_data(smoke_run: tuple[Path, str], tmp_path: Path) -> None:
    """Resuming a finished run reports it complete and exits 0 without reading the data set."""
    run_dir, _ = smoke_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["data_dir"] = str(tmp_path / "no-data-here")
    (copy / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["reproduce", "--resume", str(copy)])
    assert result.exit_code == 0, result.output
    assert "is already complete" in " ".join(result.stdout.split())
    assert "Continuing" not in result.stdout


# --- bad input ----------------------------------------------------------------------


def test_missing_cifar_names_options(tmp_path: Path) -> None:
    """A missing data set exits 2 with one line naming the path and the options."""
    result = runner.invoke(app, ["reproduce", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "CIFAR-10 not found" in result.output
    assert str(tmp_path / "cifar-10-batches-py") in result.output
    assert "--download" in result.output
    assert "Traceback" not in result.output


def test_existing_out_needs_force(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("user data")
    result = runner.invoke(app, ["reproduce", "--data-dir", str(tmp_path), "--out", str(run_dir)])
    assert result.exit_code == 2
    assert "pass --force" in result.output
    assert (run_dir / "keep.txt").read_text() == "user data"


def test_invalid_rate_is_rejected(tmp_path: Path) -> None:
    result = runner.invoke(app, ["reproduce", "--rate", "1.5", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "--rate must be between 0 and 1" in result.output
    assert not (tmp_path / "run").exists()


def test_amp_on_cpu_is_rejected(tmp_path: Path) -> None:
    if not ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 archive not found at {ARCHIVE}")
    result = runner.invoke(
        app,
        ["reproduce", "--dataset", "image-folder", "--data-dir", str(ARCHIVE), "--subset", "100",
         "--val-size", "50", "--model", "vit-micro", "--device", "cpu", "--amp", "--out", str(tmp_path / "run")],
    )
    assert result.exit_code == 2
    assert "--amp trains in bfloat16 on CUDA devices only" in result.output


def test_resume_missing_folder(tmp_path: Path) -> None:
    result = runner.invoke(app, ["reproduce", "--resume", str(tmp_path / "nothing")])
    assert result.exit_code == 2
    assert "config.json not found" in result.output


def test_unknown_model_leaves_nothing(tmp_path: Path) -> None:
    """A model that is not a timm ViT exits 2 before the run folder is created."""
    if not ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 archive not found at {ARCHIVE}")
    run_dir = tmp_path / "run"
    result = runner.invoke(
        app,
        ["reproduce", "--dataset", "image-folder", "--data-dir", str(ARCHIVE), "--subset", "100",
         "--val-size", "50", "--batch-size", "50", "--model", "resnet18", "--out", str(run_dir)],
    )
    assert result.exit_code == 2
    assert "reproduce needs a timm VisionTransformer" in result.output
    assert not run_dir.exists()


def test_timm_name_builds_vit() -> None:
    """Any timm ViT name is built untrained for the requested image size."""
    model = build_model("vit_tiny_patch16_224", num_classes=10, img_size=32, in_chans=1)
    assert model.patch_embed.proj.weight.shape[1] == 1
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 10)


FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_file(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_saliency_run(tmp_path: Path) -> None:
    """Grayscale 28x28 images and an activation criterion run through two states."""
    run_dir = tmp_path / "run"
    result = runner.invoke(
        app,
        ["reproduce", "--dataset", "fashion-mnist", "--model", "vit-micro", "--subset", "300", "--val-size", "100",
         "--batch-size", "50", "--epochs", "1", "--iters", "2", "--criterion", "saliency", "--sorting", "layer-wise",
         "--device", "cpu", "--quiet", "--out", str(run_dir)],
    )
    assert result.exit_code == 0, result.output
    assert result.output == ""
    weights = _load(run_dir / "state_1" / "model.pt")
    assert weights["patch_embed.proj.weight"].shape[1] == 1
    states = _history(run_dir)["states"]
    assert states[1]["remaining"] < 0.71
    assert sum(states[1]["heads_kept"]) < sum(states[1]["heads_total"])
