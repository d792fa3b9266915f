"""One optimizer step and one evaluation pass, shared by the loop and the throughput benchmark."""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunedoctor.train.rsst import RsstPenalty

__all__ = ["autocast_context", "train_step", "count_correct", "lr_factor"]


def autocast_context(amp: bool) -> Any:
    """Return bfloat16 CUDA autocast when ``amp`` is set, else a context that does nothing."""
    # NOTE: the CUDA and bfloat16 paths have not been run on a GPU yet; the
    # tests cover the CPU only.
    if amp:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def train_step(
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    penalty: RsstPenalty | None = None,
    penalty_lambda: float = 0.0,
    amp: bool = False,
) -> tuple[float, float]:
    """Run forward, cross-entropy, backward, the RSST penalty, the optimizer and the schedule once.

    Returns:
        The batch's mean loss and its number of correct predictions.
    """
    with autocast_context(amp):
        logits = network(images)
        loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if penalty is not None:
        penalty.add_to_gradients(penalty_lambda)
    optimizer.step()
    scheduler.step()
    correct = float((logits.detach().argmax(dim=1) == labels).sum())
    return float(loss.detach()), correct


@torch.no_grad()
def count_correct(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device, amp: bool = False
) -> tuple[float, float]:
    """Return (correct predictions, images) of ``model`` in eval mode over ``batches``."""
    was_training = model.training
    model.eval()
    correct = 0.0
    seen = 0.0
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        with autocast_context(amp):
            logits = model(images)
        correct += float((logits.argmax(dim=1) == labels).sum())
        seen += labels.shape[0]
    model.train(was_training)
    return correct, seen


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Return the learning-rate multiplier at optimizer step ``step`` of a state.

    Linear warmup over ``warmup_steps``, then ``cosine`` decay to 0 at
    ``total_steps``, or ``multistep`` division by 10 after half and after
    three quarters of the steps.
    """
    warmup = min(warmup_steps, total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return 0.1 ** sum(step >= milestone for milestone in (total_steps // 2, (3 * total_steps) // 4))
