"""The Refill / RSST iterative pruning loop behind ``prunedoctor reproduce``.

One state ``k`` of ``iters``:

1. train ``epochs`` epochs with the current masks applied through
   ``torch.nn.utils.prune.custom_from_mask`` (in state 0, the rewind point is
   a deep copy of the weights after ``rewind_epoch`` epochs, or of the initial
   weights when it is 0);
2. evaluate on the validation and test splits after every epoch;
3. take the effective trained weights through :mod:`prunedoctor.reparam`;
4. prune ``rate`` of the still-unpruned qkv, proj, fc1 and fc2 weights by
   global magnitude, and turn that mask into head and neuron masks with the
   Refill budget (:func:`prunedoctor.vit.pruning.prune_units`);
5. reset every parameter to a fresh copy of the rewind point, apply the new
   masks and create a new optimizer and learning-rate schedule;
6. save the state's files and a resume checkpoint.

With ``method="rsst"``, step 5 keeps the previous hard masks, and the next
state trains with a penalty on the weights that the new masks remove. The new
masks are applied hard at the end of that state (see
:mod:`prunedoctor.train.rsst`). The last state is not pruned further.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunedoctor.errors import PrunedoctorError
from prunedoctor.io import save_state_dict
from prunedoctor.train.batches import SplitTensors, TrainBatches, iterate_batches, iterate_eval_batches
from prunedoctor.train.config import RunConfig
from prunedoctor.train.distributed import DistributedContext, close_distributed, init_distributed
from prunedoctor.train.events import BatchProgress, RunInfo, RunObserver, RunOptions, RunResult
from prunedoctor.train.masking import (
    apply_masks,
    current_masks,
    hash_masks,
    ones_masks,
    remaining_fraction,
    reset_to_rewind_point,
    snapshot_weights,
)
from prunedoctor.train.outputs import (
    EpochRecord,
    StateRecord,
    plot_accuracy,
    save_torch_atomic,
    state_dir,
    write_history,
    write_text_atomic,
)
from prunedoctor.train.resume import (
    Position,
    capture_rng_state,
    restore_rng_state,
    save_resume_checkpoint,
)
from prunedoctor.train.rundir import attach_run_log, create_run_dir, list_run_outputs, open_run_dir
from prunedoctor.train.refill import ACTIVATION_CRITERIA, choose_next_masks
from prunedoctor.train.rsst import RsstPenalty, penalty_masks, rsst_lambda
from prunedoctor.train.step import count_correct, lr_factor, train_step

__all__ = ["RunOptions", "RunInfo", "BatchProgress", "RunObserver", "RunResult", "run_reproduction"]

_logger = logging.getLogger(__name__)

_EVAL_BATCH_SIZE = 500


@dataclass
class _EpochSums:
    loss: float = 0.0
    correct: float = 0.0
    seen: float = 0.0

    def add(self, loss: float, correct: float, seen: float) -> None:
        self.loss += loss
        self.correct += correct
        self.seen += seen


def run_reproduction(options: RunOptions, observer: RunObserver | None = None) -> RunResult:
    """Run (or resume) the iterative pruning loop and write the run folder.

    Args:
        options: Where and how to run; see :class:`RunOptions`.
        observer: Progress receiver, called on rank 0 only.

    Returns:
        The per-state and per-epoch results.

    Raises:
        PrunedoctorError: Invalid settings, a missing data set, a run folder that
            exists without ``force``, or a resume checkpoint that cannot be read.
    """
    observer = observer or RunObserver()
    context = init_distributed(options.device)
    log_handler: logging.Handler | None = None
    finished = False
    try:
        config, checkpoint = open_run_dir(options, context)
        if checkpoint is not None and checkpoint["position"].get("finished"):
            # Nothing is left to train: report the saved states without loading the data.
            _logger.debug("%s is already complete; nothing to resume", options.run_dir)
            finished = True
            return RunResult(
                options.run_dir,
                [StateRecord(**s) for s in checkpoint["states"]],
                [EpochRecord(**e) for e in checkpoint["epochs"]],
                list_run_outputs(options.run_dir),
                int(checkpoint.get("world_size", context.world_size)),
                already_complete=True,
            )
        _set_threads(options.threads, context)
        # Data and model come first, so that a missing data set or an unknown
        # model leaves no run folder behind.
        trainer = _Trainer(options, config, context, observer)
        if checkpoint is None:
            create_run_dir(options, config, context)
        if context.is_main:
            log_handler = attach_run_log(options.run_dir)
            if context.is_distributed:
                _logger.info("%d processes on %s; rank 0 writes the run folder", context.world_size, context.device)
        result = trainer.run(checkpoint)
        finished = True
        return result
    finally:
        if log_handler is not None:
            logging.getLogger("prunedoctor").removeHandler(log_handler)
            log_handler.close()
        close_distributed(context, wait_for_peers=finished)


def _set_threads(threads: int | None, context: DistributedContext) -> None:
    if threads is not None:
        if threads < 1:
            raise PrunedoctorError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    elif context.is_distributed and context.device.type == "cpu":
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", context.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_processes)))


class _Trainer:
    """State of one process of a run; the steps of the loop are its methods."""

    def __init__(
        self, options: RunOptions, config: RunConfig, context: DistributedContext, observer: RunObserver
    ) -> None:
        self.options = options
        self.config = config
        self.context = context
        self.observer = observer
        self.run_dir = options.run_dir
        self.device = context.device
        if config.amp and self.device.type != "cuda":
            raise PrunedoctorError("--amp trains in bfloat16 on CUDA devices only; drop --amp or use --device cuda")

        self._load_data()
        self._build_model()
        self.epochs: list[EpochRecord] = []
        self.states: list[StateRecord] = []
        self.sums = _EpochSums()
        self.state_seconds = 0.0
        self.pending_masks: dict[str, torch.Tensor] | None = None
        self.pending_kept: tuple[list[int], list[int]] | None = None
        self.penalty_masks: dict[str, torch.Tensor] | None = None
        self.penalty: RsstPenalty | None = None
        self.rewind: dict[str, torch.Tensor] | None = None

    # --- set-up ---------------------------------------------------------------

    def _load_data(self) -> None:
        from prunedoctor.data import load_dataset

        config = self.config
        # Rank 0 downloads alone; the other ranks read the files after it.
        download = self.options.download and self.context.is_distributed
        if download and not self.context.is_main:
            self.context.barrier()
        splits = load_dataset(
            config.dataset,
            config.data_dir,
            download=self.options.download and self.context.is_main,
            val_size=config.val_size,
            subset=config.subset,
        )
        if download and self.context.is_main:
            self.context.barrier()
        self.splits = splits
        self.train_split = SplitTensors.from_arrays(splits.train)
        self.val_split = SplitTensors.from_arrays(splits.val)
        self.test_split = SplitTensors.from_arrays(splits.test)
        self.mean = torch.tensor(splits.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(splits.std, dtype=torch.float32).view(-1, 1, 1)
        self.img_size = config.img_size or splits.image_size
        world = self.context.world_size
        if config.batch_size % world:
            raise PrunedoctorError(
                f"--batch-size {config.batch_size} is the global batch and must be divisible by the "
                f"{world} processes; choose a multiple of {world}"
            )
        self.batches_per_epoch = len(self.train_split) // config.batch_size
        if self.batches_per_epoch < 1:
            raise PrunedoctorError(
                f"--batch-size {config.batch_size} is larger than the {len(self.train_split)} training images; "
                "lower --batch-size or raise --subset"
            )
        self.total_steps = self.batches_per_epoch * config.epochs

    def _build_model(self) -> None:
        from prunedoctor.train.presets import build_model
        from prunedoctor.vit.arch import infer_architecture
        from prunedoctor.vit.pruning import prunable_weight_names

        torch.manual_seed(self.config.seed)
        model = build_model(
            self.config.model,
            num_classes=len(self.splits.classes),
            img_size=self.img_size,
            in_chans=self.splits.channels,
        )
        self.model = model.to(self.device)
        self.initial_weights = snapshot_weights(self.model)
        heads = int(self.model.blocks[0].attn.num_heads)  # type: ignore[index, union-attr]
        self.arch = infer_architecture(self.initial_weights, heads=heads)
        self.prunable = list(prunable_weight_names(self.arch))
        self.prunable_count = sum(self.initial_weights[name].numel() for name in self.prunable)
        self.masks = ones_masks(self.model, self.prunable)
        self.kept_heads = list(self.arch.heads_per_block)
        self.kept_neurons = list(self.arch.mlp_hidden)

    def _build_optimizer(self) -> None:
        """Wrap the model for DDP and create a fresh optimizer and schedule for the state."""
        config = self.config
        if self.context.is_distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # Masks are buffers that every rank computes itself, so they need no
            # broadcast before each forward pass. torch 2.14 deprecates the
            # argument in favour of forward_sync_buffers, which older releases lack.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                self.network: nn.Module = DistributedDataParallel(
                    self.model, device_ids=device_ids, broadcast_buffers=False
                )
        else:
            self.network = self.model
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.penalty = RsstPenalty(self.model, self.penalty_masks) if self.penalty_masks else None

    def _lr_factor(self, step: int) -> float:
        warmup = int(round(self.config.warmup_epochs * self.batches_per_epoch))
        return lr_factor(step, self.total_steps, warmup, self.config.lr_schedule)

    # --- the loop ---------------------------------------------------------------

    def run(self, checkpoint: dict[str, Any] | None) -> RunResult:
        if checkpoint is None:
            position = self._start_fresh()
        else:
            position = self._restore(checkpoint)
        if self.context.is_main:
            self.observer.run_started(self._run_info(position if checkpoint is not None else None))
        while not position.finished:
            if position.epoch < self.config.epochs:
                position = self._train_epoch(position)
            else:
                position = self._finish_state(position.state)
        return self._finish_run()

    def _start_fresh(self) -> Position:
        config = self.config
        _logger.info(
            "starting %s run in %s: states %d, epochs per state %d, rate %.3g, %s/%s/%s, %s on %s, processes %d",
            config.method, self.run_dir, config.iters, config.epochs, config.rate, config.criterion,
            config.sorting, config.target, config.model, self.device, self.context.world_size,
        )
        _logger.info(
            "data: %s from %s, images: train %d, validation %d, test %d; batches per epoch %d (batch size %d)",
            config.dataset, self.splits.source, len(self.train_split), len(self.val_split), len(self.test_split),
            self.batches_per_epoch, config.batch_size,
        )
        apply_masks(self.model, self.masks)
        if config.rewind_epoch == 0:
            self.rewind = {name: tensor.clone() for name, tensor in self.initial_weights.items()}
        self._build_optimizer()
        position = Position(0, 0, 0)
        self._save_checkpoint(position)
        return position

    def _restore(self, checkpoint: dict[str, Any]) -> Position:
        position = Position(**checkpoint["position"])
        self.masks = checkpoint["masks"]
        apply_masks(self.model, self.masks)
        self.model.load_state_dict(checkpoint["model"], strict=True)
        self.rewind = checkpoint["rewind"]
        self.kept_heads = list(checkpoint["kept_heads"])
        self.kept_neurons = list(checkpoint["kept_neurons"])
        self.pending_masks = checkpoint.get("pending_masks")
        pending_kept = checkpoint.get("pending_kept")
        self.pending_kept = (list(pending_kept[0]), list(pending_kept[1])) if pending_kept else None
        self.penalty_masks = checkpoint.get("penalty_masks")
        self.epochs = [EpochRecord(**e) for e in checkpoint["epochs"]]
        self.states = [StateRecord(**s) for s in checkpoint["states"]]
        self.state_seconds = float(checkpoint["state_seconds"])
        self._build_optimizer()
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.context.is_main:
            self.sums = _EpochSums(**checkpoint["sums"])
        restore_rng_state(checkpoint["rng"])
        _logger.info(
            "resumed %s at state %d, epoch %d, batch %d%s",
            self.run_dir, position.state, position.epoch, position.batch, " (finished)" if position.finished else "",
        )
        return position

    def _run_info(self, resumed_at: Position | None) -> RunInfo:
        return RunInfo(
            run_dir=self.run_dir,
            config=self.config,
            device=str(self.device),
            world_size=self.context.world_size,
            train_images=len(self.train_split),
            val_images=len(self.val_split),
            test_images=len(self.test_split),
            batches_per_epoch=self.batches_per_epoch,
            prunable_weights=self.prunable_count,
            resumed_at=resumed_at,
        )

    def _train_epoch(self, position: Position) -> Position:
        config, context = self.config, self.context
        state, epoch = position.state, position.epoch
        batches = TrainBatches(
            self.train_split,
            batch_size=config.batch_size,
            seed=config.seed,
            state=state,
            epoch=epoch,
            mean=self.mean,
            std=self.std,
            out_size=self.img_size,
            rank=context.rank,
            world_size=context.world_size,
        )
        if position.batch == 0:
            self.sums = _EpochSums()
        if context.is_main:
            self.observer.epoch_started(state, epoch, len(batches), position.batch)

        started = time.perf_counter()
        self.network.train()
        lam: float | None = None
        for index, (images, labels) in iterate_batches(batches, position.batch, self.options.workers):
            lam = self._train_step(images, labels, state, epoch, index)
            next_batch = index + 1
            if (
                self.options.save_every_batches > 0
                and next_batch % self.options.save_every_batches == 0
                and next_batch < len(batches)
            ):
                self.state_seconds += time.perf_counter() - started
                started = time.perf_counter()
                self._save_checkpoint(Position(state, epoch, next_batch))

        last_step = (epoch + 1) * len(batches) - 1
        lam = self._current_lambda(last_step) if self.penalty is not None else None
        record = self._evaluate_epoch(state, epoch, lam)
        self.state_seconds += time.perf_counter() - started
        record.seconds = self.state_seconds
        self.epochs.append(record)

        if state == 0 and epoch + 1 == config.rewind_epoch:
            self.rewind = snapshot_weights(self.model)
            _logger.info("rewind point taken after epoch %d of state 0", epoch + 1)
        _logger.info(
            "state %d epoch %d: train loss %.4f, train %.2f%%, val %.2f%%, test %.2f%%, lr %.4g%s",
            state, epoch, record.train_loss, 100 * record.train_accuracy, 100 * record.val_accuracy,
            100 * record.test_accuracy, record.lr,
            "" if lam is None else f", RSST lambda {lam:.4g}, penalised weights' norm {record.penalised_norm:.4g}",
        )
        if context.is_main:
            self.observer.epoch_finished(record)

        next_position = Position(state, epoch + 1, 0)
        self._save_checkpoint(next_position)
        if context.is_main:
            write_history(self.run_dir, self.epochs, self.states, self.config.to_dict())
        return next_position

    def _current_lambda(self, step: int) -> float:
        config = self.config
        return rsst_lambda(config.rsst_schedule, step + 1, self.total_steps, config.rsst_granularity, config.rsst_exponent)

    def _train_step(
        self, images: torch.Tensor, labels: torch.Tensor, state: int, epoch: int, index: int
    ) -> float | None:
        step = epoch * self.batches_per_epoch + index
        lam = self._current_lambda(step) if self.penalty is not None else None
        loss, correct = train_step(
            self.network,
            self.optimizer,
            self.scheduler,
            images.to(self.device, non_blocking=True),
            labels.to(self.device, non_blocking=True),
            penalty=self.penalty,
            penalty_lambda=lam or 0.0,
            amp=self.config.amp,
        )
        count = labels.shape[0]
        self.sums.add(loss * count, correct, count)
        if self.context.is_main:
            self.observer.batch_finished(
                BatchProgress(
                    state=state,
                    epoch=epoch,
                    batch=index,
                    batches=self.batches_per_epoch,
                    loss=loss,
                    accuracy=correct / count,
                    lr=self.scheduler.get_last_lr()[0],
                    rsst_lambda=lam,
                )
            )
        return lam

    @torch.no_grad()
    def _evaluate_epoch(self, state: int, epoch: int, lam: float | None) -> EpochRecord:
        if self.context.is_main:
            self.observer.evaluation_started(state, epoch)
        sums = self.context.all_reduce_sum([self.sums.loss, self.sums.correct, self.sums.seen])
        val_accuracy = self._evaluate(self.val_split)
        test_accuracy = self._evaluate(self.test_split)
        return EpochRecord(
            state=state,
            epoch=epoch,
            train_loss=sums[0] / max(sums[2], 1.0),
            train_accuracy=sums[1] / max(sums[2], 1.0),
            val_accuracy=val_accuracy,
            test_accuracy=test_accuracy,
            lr=float(self.scheduler.get_last_lr()[0]),
            rsst_lambda=lam,
            penalised_norm=self.penalty.norm() if self.penalty is not None else None,
        )

    def _evaluate(self, split: SplitTensors) -> float:
        batches = iterate_eval_batches(
            split,
            batch_size=_EVAL_BATCH_SIZE,
            mean=self.mean,
            std=self.std,
            out_size=self.img_size,
            rank=self.context.rank,
            world_size=self.context.world_size,
        )
        correct, seen = count_correct(self.model, batches, self.device, self.config.amp)
        total = self.context.all_reduce_sum([correct, seen])
        return total[0] / max(total[1], 1.0)

    # --- end of a state -------------------------------------------------------------

    def _finish_state(self, state: int) -> Position:
        """Record the state, choose and apply the next masks, write the state's files and a checkpoint."""
        started = time.perf_counter()
        after_cut: float | None = None
        if self.pending_masks is not None:
            after_cut = self._apply_pending_masks(state)
        record = self._state_record(state, after_cut)

        # Copies, because preparing the next state resets the live parameters
        # in place and replaces self.masks.
        weights = snapshot_weights(self.model)
        masks = {name: mask.clone() for name, mask in self.masks.items()}
        self._check_masks_agree(state)
        last = state + 1 >= self.config.iters
        if not last:
            self._prepare_next_state(weights)
        self.state_seconds += time.perf_counter() - started
        record.seconds = self.state_seconds
        self.states.append(record)

        if self.context.is_main:
            self._write_state_files(state, record, weights, masks)
        _logger.info(
            "state %d done: %.2f%% of prunable weights remain, %d heads and %d neurons kept, "
            "test accuracy %.2f%% at the best validation epoch %d, %.1f s",
            state, 100 * record.remaining, sum(record.heads_kept), sum(record.neurons_kept),
            100 * record.test_accuracy, record.best_epoch, record.seconds,
        )
        if self.context.is_main:
            self.observer.state_finished(record)
        self.state_seconds = 0.0
        position = Position(state, self.config.epochs, 0, finished=True) if last else Position(state + 1, 0, 0)
        self._save_checkpoint(position)
        return position

    def _apply_pending_masks(self, state: int) -> float:
        """Apply the RSST structured masks hard and return the test accuracy after the cut."""
        assert self.pending_masks is not None and self.pending_kept is not None
        self.masks = self.pending_masks
        apply_masks(self.model, self.masks)
        self.kept_heads, self.kept_neurons = self.pending_kept
        self.pending_masks = None
        self.pending_kept = None
        self.penalty_masks = None
        self.penalty = None
        accuracy = self._evaluate(self.test_split)
        _logger.info("state %d: structured masks applied hard, test accuracy %.2f%%", state, 100 * accuracy)
        return accuracy

    def _state_record(self, state: int, after_cut: float | None) -> StateRecord:
        own = [e for e in self.epochs if e.state == state]
        best = max(own, key=lambda e: (e.val_accuracy, -e.epoch))
        return StateRecord(
            state=state,
            remaining=remaining_fraction(self.masks),
            heads_kept=list(self.kept_heads),
            neurons_kept=list(self.kept_neurons),
            best_epoch=best.epoch,
            val_accuracy=best.val_accuracy,
            test_accuracy=best.test_accuracy,
            seconds=0.0,
            masks_sha256=hash_masks(self.masks),
            test_accuracy_after_cut=after_cut,
            heads_total=list(self.arch.heads_per_block),
            neurons_total=list(self.arch.mlp_hidden),
        )

    def _check_masks_agree(self, state: int) -> None:
        """Compare the hash of the masks that every rank computed; raise if they differ."""
        digest = hash_masks(self.masks)
        if digest != hash_masks(current_masks(self.model)):
            raise RuntimeError(f"state {state}: the model's masks differ from the masks the loop applied")
        if self.context.is_distributed:
            # Logged by every rank (rank 0 into log.txt, all with --verbose on stderr).
            _logger.info("rank %d: state %d masks sha256 %s", self.context.rank, state, digest)
        digests = self.context.all_gather(digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"masks of state {state} differ between ranks: {digests}")
        _logger.info("state %d masks sha256 %s, identical on %d rank(s)", state, digest, len(digests))

    def _prepare_next_state(self, weights: dict[str, torch.Tensor]) -> None:
        chosen = choose_next_masks(
            self.model, weights, self.masks, self.arch, self.prunable, self.config, self._calibration_batches()
        )
        if self.config.method == "rsst":
            # Train the next state with the current hard masks and a penalty;
            # the structured masks are applied when it ends.
            self.penalty_masks = penalty_masks(chosen.unstructured, chosen.structured)
            self.pending_masks = chosen.structured
            self.pending_kept = (chosen.kept_heads, chosen.kept_neurons)
            next_masks = self.masks
        else:
            next_masks = chosen.structured
            self.kept_heads, self.kept_neurons = chosen.kept_heads, chosen.kept_neurons
        if self.rewind is None:
            raise RuntimeError("the rewind point was never taken")
        reset_to_rewind_point(self.model, self.rewind, next_masks)
        self.masks = next_masks
        self._build_optimizer()

    def _calibration_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Return the first training batches, not augmented, for the activation criteria (empty otherwise)."""
        if self.config.criterion not in ACTIVATION_CRITERIA:
            return []
        batches = iterate_eval_batches(
            self.train_split, batch_size=self.config.batch_size, mean=self.mean, std=self.std, out_size=self.img_size
        )
        chosen = []
        for images, labels in batches:
            chosen.append((images.to(self.device), labels.to(self.device)))
            if len(chosen) >= self.config.calibration_batches:
                break
        return chosen

    # --- files ----------------------------------------------------------------------

    def _write_state_files(
        self,
        state: int,
        record: StateRecord,
        weights: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor],
    ) -> None:
        folder = state_dir(self.run_dir, state)
        folder.mkdir(parents=True, exist_ok=True)
        # force: a resumed run rewrites the files of a state whose checkpoint
        # was not saved before the kill; the content is the same.
        save_state_dict(weights, folder / "model.pt", force=True)
        save_state_dict(masks, folder / "masks.pt", force=True)
        if self.rewind is not None:
            save_state_dict(self.rewind, folder / "rewind.pt", force=True)
        import json

        write_text_atomic(folder / "config.json", json.dumps({"state": state, **self.config.to_dict()}, indent=2) + "\n")
        save_torch_atomic(capture_rng_state(), folder / "rng.pt")
        write_text_atomic(folder / "record.json", json.dumps(asdict(record), indent=2) + "\n")
        write_history(self.run_dir, self.epochs, self.states, self.config.to_dict())

    def _save_checkpoint(self, position: Position) -> None:
        # Every rank takes part in the reduction; only rank 0 writes.
        sums = self.context.all_reduce_sum([self.sums.loss, self.sums.correct, self.sums.seen])
        if not self.context.is_main:
            return
        payload = {
            "config": self.config.to_dict(),
            "position": position.to_dict(),
            "model": {name: tensor.detach().cpu().clone() for name, tensor in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "masks": self.masks,
            "pending_masks": self.pending_masks,
            "pending_kept": self.pending_kept,
            "penalty_masks": self.penalty_masks,
            "rewind": self.rewind,
            "kept_heads": self.kept_heads,
            "kept_neurons": self.kept_neurons,
            "sums": {"loss": sums[0], "correct": sums[1], "seen": sums[2]},
            "epochs": [asdict(e) for e in self.epochs],
            "states": [asdict(s) for s in self.states],
            "state_seconds": self.state_seconds,
            "rng": capture_rng_state(),
            "world_size": self.context.world_size,
        }
        save_resume_checkpoint(self.run_dir, payload)
        _logger.info(
            "resume checkpoint saved at state %d, epoch %d, batch %d", position.state, position.epoch, position.batch
        )

    def _finish_run(self) -> RunResult:
        files: list[Path] = []
        if self.context.is_main:
            write_history(self.run_dir, self.epochs, self.states, self.config.to_dict())
            title = f"{self.config.model} on {self.config.dataset}, {self.config.method}, rate {self.config.rate:g}"
            plot_accuracy(self.run_dir / "accuracy.png", self.states, title)
            _logger.info("run finished: %d states written to %s", len(self.states), self.run_dir)
            files = list_run_outputs(self.run_dir)
        return RunResult(self.run_dir, list(self.states), list(self.epochs), files, self.context.world_size)

