"""DistributedDataParallel set-up for runs started by ``torchrun``.

``torchrun`` (``python -m torch.distributed.run``) sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` for every process. Without them the run is
a single process. The backend is gloo on the CPU and nccl on CUDA devices.
Only rank 0 writes files.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from prunedoctor.errors import PrunedoctorError

__all__ = ["DistributedContext", "init_distributed", "close_distributed", "resolve_device"]

_logger = logging.getLogger(__name__)


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """Return the device for ``auto``, ``cpu`` or ``cuda`` (one GPU per local rank).

    Raises:
        PrunedoctorError: ``cuda`` was requested and no CUDA device is available.
    """
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise PrunedoctorError("--device cuda was requested but torch finds no CUDA device; use --device cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if choice != "auto":
        raise PrunedoctorError(f"--device {choice!r} is invalid; choose auto, cpu or cuda")
    return torch.device("cpu")


@dataclass
class DistributedContext:
    """This process's place in the run.

    Attributes:
        rank: Global rank, 0 for a single process.
        world_size: Number of processes.
        local_rank: Rank on this machine (selects the GPU).
        device: Device that this process trains on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and shows progress (rank 0)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """Whether there are several processes."""
        return self.world_size > 1

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Return the element-wise sum of ``values`` over all ranks."""
        if not self.is_distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return [float(v) for v in tensor.cpu()]

    def all_gather(self, value: Any) -> list[Any]:
        """Return ``value`` from every rank, in rank order."""
        if not self.is_distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast(self, value: Any) -> Any:
        """Return rank 0's ``value`` on every rank."""
        if not self.is_distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank reaches this point."""
        if self.is_distributed:
            dist.barrier()


def init_distributed(device_choice: str) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Raises:
        PrunedoctorError: The environment variables are invalid or the device is unavailable.
    """
    world_size = _read_env_int("WORLD_SIZE", 1)
    rank = _read_env_int("RANK", 0)
    local_rank = _read_env_int("LOCAL_RANK", 0)
    device = resolve_device(device_choice, local_rank)
    if world_size <= 1:
        return DistributedContext(0, 1, 0, device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    _logger.info("rank %d of %d joined the %s process group on %s", rank, world_size, backend, device)
    return DistributedContext(rank, world_size, local_rank, device)


def close_distributed(context: DistributedContext, *, wait_for_peers: bool = True) -> None:
    """Leave the process group (no-op for a single process).

    With ``wait_for_peers``, every rank first waits at a barrier, so that no
    rank tears down its gloo connections while rank 0 is still writing the
    last state. A rank that left early made its peers abort with SIGABRT.
    Pass False on an error path, where a peer may never reach the barrier.
    """
    if not (context.is_distributed and dist.is_initialized()):
        return
    if wait_for_peers:
        dist.barrier()
    dist.destroy_process_group()


def _read_env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as error:
        raise PrunedoctorError(f"environment variable {name}={raw!r} is not an integer") from error
