"""RSST: pull the weights that the next structured masks remove towards zero during training.

After a state chose structured masks ``S`` from the unstructured mask ``M``,
the next state trains with its previous hard masks and, after every backward
pass, adds ``lambda(t) * w`` to the gradient of each weight that ``M`` keeps
but ``S`` removes. ``S`` is applied hard at the end of that state. The
penalty follows the RST idea of Bai et al., "Dual Lottery Ticket Hypothesis",
ICLR 2022.

``lambda`` grows with the optimizer step ``t`` of the state (``T`` steps in
all) up to the granularity ``g``; see :func:`rsst_lambda`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from prunedoctor.errors import PrunedoctorError

__all__ = ["rsst_lambda", "penalty_masks", "RsstPenalty"]


def rsst_lambda(schedule: str, step: int, total_steps: int, granularity: float, exponent: float = 4.0) -> float:
    """Return ``lambda`` at optimizer step ``step`` of ``total_steps``.

    Schedules, with ``x = step / total_steps`` and ``g = granularity``:
    ``x``: ``g*x``; ``x^2``: ``g*x**2``; ``x^3``: ``g*x**3``;
    ``exp``: ``g*(e**x - 1)/(e - 1)``;
    ``exp_custom_exponents``: ``g*(e**(x**exponent) - 1)/(e - 1)``.
    Every schedule is 0 at step 0 and ``g`` at the last step.

    Raises:
        PrunedoctorError: Unknown schedule or a step count below 1.
    """
    if total_steps < 1:
        raise PrunedoctorError(f"RSST needs at least one optimizer step per state, got {total_steps}")
    x = min(max(step / total_steps, 0.0), 1.0)
    if schedule == "x":
        value = x
    elif schedule == "x^2":
        value = x**2
    elif schedule == "x^3":
        value = x**3
    elif schedule == "exp":
        value = (math.exp(x) - 1.0) / (math.e - 1.0)
    elif schedule == "exp_custom_exponents":
        value = (math.exp(x**exponent) - 1.0) / (math.e - 1.0)
    else:
        raise PrunedoctorError(
            f"--rsst-schedule {schedule!r} is invalid; choose x, x^2, x^3, exp or exp_custom_exponents"
        )
    return granularity * value


def penalty_masks(
    unstructured: Mapping[str, torch.Tensor], structured: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Return name -> 0/1 float mask of the weights that ``unstructured`` keeps and ``structured`` removes."""
    result = {}
    for name, keep in unstructured.items():
        penalised = torch.logical_and(keep != 0, structured[name] == 0)
        result[name] = penalised.to(torch.float32)
    return result


class RsstPenalty:
    """Adds ``lambda * w`` to the gradients of the penalised weights of a pruned model.

    The penalty applies to the tensor that the optimizer updates, which is
    ``X_orig`` when the model carries the pruning reparametrization. Each
    penalty mask is kept on that tensor's device.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        self.targets: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, mask in masks.items():
            module_name, _, attribute = name.rpartition(".")
            module = model.get_submodule(module_name)
            parameter = getattr(module, attribute + "_orig", None)
            if parameter is None:
                parameter = getattr(module, attribute)
            self.targets.append((parameter, mask.to(device=parameter.device, dtype=parameter.dtype)))

    @property
    def count(self) -> int:
        """Number of penalised weights."""
        return int(sum(int(mask.sum()) for _, mask in self.targets))

    @torch.no_grad()
    def add_to_gradients(self, lam: float) -> None:
        """Add ``lam * w * penalty_mask`` to each target's gradient (after the backward pass)."""
        if lam == 0.0:
            return
        for parameter, mask in self.targets:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            parameter.grad.add_(parameter * mask, alpha=lam)

    @torch.no_grad()
    def norm(self) -> float:
        """Return the L2 norm of the penalised weights."""
        total = 0.0
        for parameter, mask in self.targets:
            total += float((parameter * mask).float().pow(2).sum())
        return math.sqrt(total)
