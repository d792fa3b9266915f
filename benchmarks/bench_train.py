"""Training throughput of the reproduce loop's step against a bare timm training loop.

Usage::

    python benchmarks/bench_train.py [--model vit-demo] [--batch-size 128] [--steps 10]
                                     [--rounds 5] [--threads N] [--json]

Both loops train the same timm ``VisionTransformer`` (same seed) with SGD on
the same pre-built batches, in one process with the same torch thread count:

- ``bare``: forward, cross-entropy, ``zero_grad``, backward, ``optimizer.step``;
- ``refill``: the step that ``prunedoctor reproduce`` runs
  (:func:`prunedoctor.train.step.train_step`) on a model whose qkv, proj, fc1
  and fc2 weights carry state-1 Refill masks through
  ``torch.nn.utils.prune.custom_from_mask``, with the learning-rate schedule,
  the running loss and accuracy sums and a progress event per batch;
- ``rsst``: the same plus the RSST gradient penalty on the weights that the
  next masks remove.

The loops take turns step by step (the order rotates every step) for
``--rounds`` rounds of ``--steps`` steps after one warm-up round. Each step of
a loop is timed against the ``bare`` step on the same batch right beside it.
The median of these per-step time ratios is reported, because load from other
processes on the machine then affects every loop alike. Batches come from the real CIFAR-10 archive at
``../shared/data/cifar10-jpg.tar.gz`` when it exists, else from random images
(the throughput does not depend on the pixel values). Exits 1 when the median
overhead of ``refill`` exceeds ``--max-overhead``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prunedoctor.data import ImageArrays, load_dataset  # noqa: E402
from prunedoctor.train.batches import SplitTensors, TrainBatches  # noqa: E402
from prunedoctor.train.events import BatchProgress, RunObserver  # noqa: E402
from prunedoctor.train.masking import apply_masks, effective_weights, ones_masks  # noqa: E402
from prunedoctor.train.presets import build_model  # noqa: E402
from prunedoctor.train.rsst import RsstPenalty, penalty_masks  # noqa: E402
from prunedoctor.train.step import lr_factor, train_step  # noqa: E402
from prunedoctor.vit.arch import infer_architecture  # noqa: E402
from prunedoctor.vit.pruning import PruneConfig, prunable_weight_names, prune_units  # noqa: E402

ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-5


def load_batches(batch_size: int, steps: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], str]:
    """Return ``steps`` augmented, normalised training batches and where their images came from."""
    count = batch_size * steps
    if ARCHIVE.is_file():
        splits = load_dataset("image-folder", ARCHIVE, val_size=100, subset=count)
        arrays, mean, std, source = splits.train, splits.mean, splits.std, f"real CIFAR-10 ({ARCHIVE.name})"
    else:
        rng = np.random.default_rng(0)
        arrays = ImageArrays(rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), np.arange(count) % 10)
        mean, std, source = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "random images (CIFAR-10 archive not found)"
    split = SplitTensors.from_arrays(arrays)
    batches = TrainBatches(
        split, batch_size=batch_size, seed=0, state=0, epoch=0,
        mean=torch.tensor(mean).view(-1, 1, 1), std=torch.tensor(std).view(-1, 1, 1), out_size=32,
    )
    return [batches[i] for i in range(len(batches))], source


Step = Callable[[int, tuple[torch.Tensor, torch.Tensor]], None]


def make_bare(model_name: str) -> Step:
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=10, img_size=32, in_chans=3).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def step(index: int, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        images, labels = batch
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def make_loop(model_name: str, total_steps: int, steps_per_epoch: int, *, rsst: bool) -> Step:
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=10, img_size=32, in_chans=3).train()
    weights = effective_weights(model)
    arch = infer_architecture(weights, heads=int(model.blocks[0].attn.num_heads))
    names = prunable_weight_names(arch)
    dense = ones_masks(model, names)
    config = PruneConfig(sorting="global", target="both", refill=True, rate=0.3)
    result = prune_units(weights, dense, arch, config)
    structured = {name: result.masks[name].float() for name in names}
    penalty_targets = None
    if rsst:
        # RSST trains with the previous (here: dense) masks and penalises what S removes.
        assert result.refill_masks is not None
        penalty_targets = penalty_masks(result.refill_masks, structured)
        apply_masks(model, dense)
    else:
        apply_masks(model, structured)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, 10, "cosine"))
    penalty = RsstPenalty(model, penalty_targets) if penalty_targets else None
    observer = RunObserver()
    sums = [0.0, 0.0, 0.0]

    def step(index: int, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        images, labels = batch
        lam = 0.5 if penalty is not None else None
        loss, correct = train_step(model, optimizer, scheduler, images, labels,
                                   penalty=penalty, penalty_lambda=lam or 0.0)
        count = labels.shape[0]
        sums[0] += loss * count
        sums[1] += correct
        sums[2] += count
        observer.batch_finished(BatchProgress(0, 0, index, steps_per_epoch, loss, correct / count,
                                              scheduler.get_last_lr()[0], lam))

    return step


def measure_round(steps: dict[str, Step], batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, list[float]]:
    """Run every loop once per batch, rotating the order, and return each loop's step times in seconds."""
    names = list(steps)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for index, batch in enumerate(batches):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            steps[name](index, batch)
            seconds[name].append(time.perf_counter() - started)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit-demo", help="preset or timm ViT name (default: vit-demo)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default: 128)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per loop and round (default: 10)")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds after one warm-up (default: 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--max-overhead", type=float, default=0.10,
                        help="fail when refill is slower than bare by more than this fraction (default: 0.10)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    batches, source = load_batches(args.batch_size, args.steps)
    total_steps = args.steps * (args.rounds + 1)
    loops = {
        "bare": make_bare(args.model),
        "refill": make_loop(args.model, total_steps, len(batches), rsst=False),
        "rsst": make_loop(args.model, total_steps, len(batches), rsst=True),
    }
    measure_round(loops, batches)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(args.rounds):
        for name, seconds in measure_round(loops, batches).items():
            times[name].extend(seconds)

    ratios = {name: statistics.median(t / b for t, b in zip(times[name], times["bare"])) for name in loops}
    result = {
        "model": args.model,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "images": source,
        "images_per_second": {name: args.batch_size / statistics.median(t) for name, t in times.items()},
        "median_time_ratio": ratios,
        "overhead": {name: ratio - 1.0 for name, ratio in ratios.items() if name != "bare"},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.model}, batch {args.batch_size}, {torch.get_num_threads()} threads, {args.rounds} rounds of "
              f"{args.steps} steps, {source}")
        for name in loops:
            print(f"  {name:7s} {result['images_per_second'][name]:8.1f} images/s   "
                  f"step time / bare step time (median of {len(times[name])}) {ratios[name]:.3f}")
    return 1 if ratios["refill"] - 1.0 > args.max_overhead else 0


if __name__ == "__main__":
    sys.exit(main())
