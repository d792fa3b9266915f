"""Time head/MLP magnitude pruning of a ViT-Base checkpoint against a per-head loop baseline.

Usage::

    python benchmarks/bench_prune.py [--repeats 5] [--threads N] [--json]

The first run writes a ViT-Base-shaped checkpoint to ``benchmarks/_work/``
(about 690 MB, git-ignored), and later runs reuse it. It has width 768, 12
blocks, 12 heads, MLP width 3072 and 224x224 images in 16x16 patches, with
random weights and 20% random masks on every qkv, proj, fc1 and fc2 weight,
saved with ``torch.nn.utils.prune`` reparametrization.

Three numbers are reported: the load (read the file, merge ``orig * mask``,
infer the architecture), :func:`prunedoctor.vit.pruning.prune_units` with
``magnitude`` on heads and neurons (ratio 0.5 each, layer-wise), and the
baseline below on the same weights, in the same run. The pruning times are
the median and the minimum over ``--repeats`` runs, and the two
implementations are checked to give the same masks. The 1-minute load
average is printed too, because other processes on the machine slow the
memory-bound mask writing more than the baseline's Python loop. On a
machine shared with other jobs, ``--threads 1`` gives steadier numbers:
OpenMP threads that wait for a descheduled sibling spin and slow both
implementations several-fold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prunedoctor.loading import load_checkpoint  # noqa: E402
from prunedoctor.reparam import effective_state_dict, masks_of  # noqa: E402
from prunedoctor.vit.arch import VitArchitecture, infer_architecture  # noqa: E402
from prunedoctor.vit.pruning import PruneConfig, prune_units  # noqa: E402

WORK = ROOT / "benchmarks" / "_work"
CHECKPOINT = WORK / "vit_base_reparam.pt"
HEADS = 12
RATIO = 0.5


def make_checkpoint(path: Path) -> None:
    """Write a ViT-Base state dict with 20% random masks applied through torch.nn.utils.prune."""
    import torch.nn.utils.prune as prune
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=HEADS,
                              mlp_ratio=4.0, num_classes=1000, weight_init="skip")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    for block in model.blocks:
        for module in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            prune.random_unstructured(module, "weight", amount=0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(model.state_dict(), temporary)
    temporary.replace(path)


def baseline_prune(
    weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], num_heads: int, head_ratio: float,
    mlp_ratio: float,
) -> dict[str, torch.Tensor]:
    """Prune heads and neurons layer by layer and unit by unit, in the style of public research scripts.

    Written for this benchmark as the baseline. It walks the state dict,
    views each qkv weight as ``[3, heads, head_dim, width]``, sorts the head
    magnitudes, builds the qkv mask from a zero tensor, and then zeroes the
    proj columns in a Python loop over heads with a tensor membership test.
    The MLP part does the same per neuron for fc2.
    """
    new_masks: dict[str, torch.Tensor] = {}
    for name in weights:
        if name.endswith("attn.qkv.weight"):
            width = weights[name].shape[1]
            head_dim = width // num_heads
            weight = weights[name].view(3, num_heads, head_dim, width)
            importance = weight.abs().sum(dim=[0, 2, 3])
            keep_count = max(1, int(num_heads * (1 - head_ratio)))
            _, order = importance.sort(descending=True)
            keep = order[:keep_count]
            qkv_mask = torch.zeros_like(weight)
            qkv_mask[:, keep, :, :] = 1
            new_masks[name] = qkv_mask.view(weights[name].shape)
            proj_name = name.replace("qkv", "proj")
            proj_mask = torch.ones_like(masks[proj_name])
            for head in range(num_heads):
                if head not in keep:
                    proj_mask[:, head * head_dim : (head + 1) * head_dim] = 0
            new_masks[proj_name] = proj_mask
        elif name.endswith("mlp.fc1.weight"):
            hidden = weights[name].shape[0]
            importance = weights[name].abs().sum(dim=1)
            keep_count = max(1, int(hidden * (1 - mlp_ratio)))
            _, order = importance.sort(descending=True)
            keep = order[:keep_count]
            fc1_mask = torch.zeros_like(weights[name])
            fc1_mask[keep, :] = 1
            new_masks[name] = fc1_mask
            fc2_name = name.replace("fc1", "fc2")
            fc2_mask = torch.ones_like(masks[fc2_name])
            for neuron in range(hidden):
                if neuron not in keep:
                    fc2_mask[:, neuron] = 0
            new_masks[fc2_name] = fc2_mask
    return new_masks


def time_runs(function: Callable[[], object], repeats: int) -> tuple[list[float], object]:
    """Return the wall times of ``repeats`` calls and the last result."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return times, result


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], VitArchitecture]:
    loaded = load_checkpoint(path)
    weights = effective_state_dict(loaded.state_dict)
    masks = masks_of(loaded.state_dict)
    return weights, masks, infer_architecture(loaded.state_dict, heads=HEADS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each implementation (median)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice, one per core)")
    options = parser.parse_args()
    if options.threads is not None:
        torch.set_num_threads(options.threads)

    if not CHECKPOINT.is_file():
        print(f"writing {CHECKPOINT} (first run only)", file=sys.stderr)
        make_checkpoint(CHECKPOINT)
    started = time.perf_counter()
    weights, masks, arch = load(CHECKPOINT)
    load_seconds = time.perf_counter() - started

    config = PruneConfig(criterion="magnitude", target="both", head_ratio=RATIO, mlp_ratio=RATIO)
    ours_times, ours = time_runs(lambda: prune_units(weights, masks, arch, config), options.repeats)
    baseline_times, baseline = time_runs(lambda: baseline_prune(weights, masks, HEADS, RATIO, RATIO), options.repeats)
    same = all(torch.equal(ours.masks[name], baseline[name]) for name in baseline)  # type: ignore[attr-defined,index]
    ours_median, baseline_median = statistics.median(ours_times), statistics.median(baseline_times)
    results = {
        "checkpoint": str(CHECKPOINT.relative_to(ROOT)),
        "size_bytes": CHECKPOINT.stat().st_size,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "repeats": options.repeats,
        "load_seconds": round(load_seconds, 3),
        "prune_units_seconds": {"median": round(ours_median, 4), "min": round(min(ours_times), 4)},
        "baseline_seconds": {"median": round(baseline_median, 4), "min": round(min(baseline_times), 4)},
        "speedup_median": round(baseline_median / ours_median, 1),
        "same_masks": same,
        "target_seconds": 0.3,
        "within_target": ours_median <= 0.3,
    }
    if options.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"load (read, merge orig * mask, infer architecture): {load_seconds:.2f} s")
        print(f"prune_units, magnitude, heads and neurons: median {ours_median:.3f} s, "
              f"min {min(ours_times):.3f} s ({options.repeats} runs)")
        print(f"per-head loop baseline, same weights:       median {baseline_median:.3f} s, "
              f"min {min(baseline_times):.3f} s")
        print(f"speedup (medians): {baseline_median / ours_median:.1f}x; same masks: {same}; "
              f"median within 0.3 s: {ours_median <= 0.3}")
        print(f"torch threads {torch.get_num_threads()}, "
              f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
