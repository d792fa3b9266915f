"""RSST: the lambda schedules and the gradient penalty on a real pruned timm ViT."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunedoctor.errors import PrunedoctorError
from prunedoctor.train.config import RunConfig
from prunedoctor.train.events import RunOptions, RunResult
from prunedoctor.train.loop import run_reproduction
from prunedoctor.train.masking import apply_masks
from prunedoctor.train.presets import build_model
from prunedoctor.train.rsst import RsstPenalty, penalty_masks, rsst_lambda

SCHEDULES = ["x", "x^2", "x^3", "exp", "exp_custom_exponents"]


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("x", 0.5),
        ("x^2", 0.25),
        ("x^3", 0.125),
        ("exp", (math.exp(0.5) - 1) / (math.e - 1)),
        ("exp_custom_exponents", (math.exp(0.5**4) - 1) / (math.e - 1)),
    ],
)
def test_lambda_at_half_state(schedule: str, expected: float) -> None:
    assert rsst_lambda(schedule, 50, 100, 1.0, 4.0) == pytest.approx(expected)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_lambda_ends_at_granularity(schedule: str) -> None:
    assert rsst_lambda(schedule, 0, 100, 2.5) == 0.0
    assert rsst_lambda(schedule, 100, 100, 2.5) == pytest.approx(2.5)


@settings(max_examples=40, deadline=None)
@given(
    schedule=st.sampled_from(SCHEDULES),
    total=st.integers(min_value=1, max_value=10_000),
    step=st.integers(min_value=0, max_value=10_000),
)
def test_lambda_grows_with_step(schedule: str, total: int, step: int) -> None:
    """lambda never decreases from one step to the next."""
    assert rsst_lambda(schedule, step + 1, total, 1.0) >= rsst_lambda(schedule, step, total, 1.0)


def test_custom_exponent_stays_small_early() -> None:
    """With p = 4 the penalty is still below 1 % of g halfway through the state."""
    assert rsst_lambda("exp_custom_exponents", 50, 100, 1.0, 4.0) < 0.04


def test_lambda_rejects_unknown_schedule() -> None:
    with pytest.raises(PrunedoctorError, match="--rsst-schedule 'linear' is invalid"):
        rsst_lambda("linear", 1, 10, 1.0)


def test_penalty_masks_keep_minus_structured() -> None:
    unstructured = {"w": torch.tensor([1.0, 1.0, 0.0, 0.0])}
    structured = {"w": torch.tensor([1.0, 0.0, 1.0, 0.0])}
    assert penalty_masks(unstructured, structured)["w"].tolist() == [0.0, 1.0, 0.0, 0.0]


def _pruned_vit() -> tuple[torch.nn.Module, str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("vit-micro", num_classes=10, img_size=32, in_chans=3)
    name = "blocks.0.mlp.fc1.weight"
    mask = torch.ones_like(model.blocks[0].mlp.fc1.weight)
    mask[:8] = 0
    apply_masks(model, {name: mask})
    penalised = torch.zeros_like(mask)
    penalised[8:16] = 1
    return model, name, penalised


def test_penalty_adds_lambda_times_weight() -> None:
    """The gradient of weight_orig grows by lambda * w on penalised entries only."""
    model, name, penalised = _pruned_vit()
    fc1 = model.blocks[0].mlp.fc1
    fc1.weight_orig.grad = torch.zeros_like(fc1.weight_orig)
    penalty = RsstPenalty(model, {name: penalised})
    penalty.add_to_gradients(0.5)
    expected = 0.5 * fc1.weight_orig.detach() * penalised
    assert torch.allclose(fc1.weight_orig.grad, expected)
    assert penalty.count == 8 * fc1.weight_orig.shape[1]


def test_penalty_pulls_weights_to_zero() -> None:
    """SGD with the penalty alone shrinks the penalised weights' norm and leaves the others."""
    model, name, penalised = _pruned_vit()
    fc1 = model.blocks[0].mlp.fc1
    penalty = RsstPenalty(model, {name: penalised})
    untouched = fc1.weight_orig.detach()[16:].clone()
    before = penalty.norm()
    optimizer = torch.optim.SGD([fc1.weight_orig], lr=0.1)
    for step in range(20):
        optimizer.zero_grad()
        fc1.weight_orig.grad = torch.zeros_like(fc1.weight_orig)
        penalty.add_to_gradients(rsst_lambda("x", step + 1, 20, 1.0))
        optimizer.step()
    assert penalty.norm() < 0.5 * before
    assert torch.equal(fc1.weight_orig.detach()[16:], untouched)


REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


@pytest.fixture(scope="module")
def rsst_run(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    if not ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 archive not found at {ARCHIVE}")
    config = RunConfig(
        dataset="image-folder", data_dir=str(ARCHIVE), subset=400, val_size=100, model="vit-micro",
        iters=3, epochs=1, batch_size=40, method="rsst", rsst_schedule="x", rsst_granularity=2.0,
    )
    options = RunOptions(config, tmp_path_factory.mktemp("rsst") / "run", device="cpu", save_every_batches=0)
    return run_reproduction(options)


@pytest.mark.slow
def test_rsst_run_logs_lambda(rsst_run: RunResult) -> None:
    """States after the first log lambda (reaching g at the end) and the penalised weights' norm."""
    first, *later = rsst_run.epochs
    assert first.rsst_lambda is None
    for record in later:
        assert record.rsst_lambda == pytest.approx(2.0)
        assert record.penalised_norm is not None and record.penalised_norm > 0


@pytest.mark.slow
def test_rsst_cut_applied_at_state_end(rsst_run: RunResult) -> None:
    """Each later state ends with the structured masks applied hard, one state behind Refill."""
    states = rsst_run.states
    assert states[0].test_accuracy_after_cut is None
    assert states[1].test_accuracy_after_cut is not None
    assert states[0].remaining == 1.0
    assert 0.6 < states[1].remaining < 0.7
    assert states[2].remaining < states[1].remaining


@pytest.mark.slow
def test_rsst_checkpoint_respects_masks(rsst_run: RunResult) -> None:
    folder = rsst_run.run_dir / "state_2"
    weights = torch.load(folder / "model.pt", weights_only=True)
    masks = torch.load(folder / "masks.pt", weights_only=True)
    for name, mask in masks.items():
        assert bool((weights[name][mask == 0] == 0).all()), f"{name} is nonzero where its mask is 0"
