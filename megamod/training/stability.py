"""Keep a run alive through bad steps: `StabilityGuard`, which the loop calls at named
points of every step.

  inject          after forward/backward: fault injection for tests (`inject_nan_at`,
                  `inject_spike_at`: the last rank only, each iteration once per run).
  skip_nonfinite  after megatron-core's schedule has reduced the gradients: every rank
                  checks its loss and gradient buffers for NaN/Inf (one reduction per
                  buffer) and one all-reduce (MIN) finds the first rank that saw a bad
                  loss and the first that saw bad gradients. If any rank saw
                  one, every rank skips the update together, so parameters, optimizer
                  state and LR schedule stay as they were and identical across ranks; the
                  log names the iteration and the first rank that saw it.
                  `on_nonfinite: stop` raises instead. In fp16 a non-finite gradient with
                  a finite loss is an overflow, which dynamic loss scaling expects: the
                  scale backs off (megatron-core's DynamicGradScaler, on every rank alike,
                  since any rank's overflow counts) and the step is skipped without counting
                  as a failure (`train/overflow_steps`). Only when the scale cannot come
                  down any more (at min_loss_scale, or a static loss_scale) is an overflow
                  a non-finite step. The check runs before megatron-core's own overflow
                  check (`prepare_grads`), which agrees only within each optimizer's
                  model-parallel group: a fault on one data-parallel rank after the
                  reduction would leave the ranks with different scales.
  skip_spike      once the gradients are ready and their norm known, before the update:
                  the loss and gradient norm, made the same on every rank (max over all
                  ranks), against the mean and standard deviation of the last
                  `spike_window` applied steps; above `spike_zscore` it is a spike
                  (`train/spikes`), skipped like a non-finite step or only logged.
  rollback_due    after the step: `max_consecutive_skips` skips in a row; the loop then
                  reloads the last good checkpoint (`start_rollback` refuses past
                  `max_rollbacks`) and moves the data on (`rollback_data_position`, PaLM's
                  remedy for loss spikes: skip the batches that led there).

megatron-core's rerun state machine (rerun_state_machine.py, left DISABLED by
megamod.parallel) does not fit here: it attributes a suspicious result to the hardware by
re-running the step on the same GPU and then, after a checkpoint-and-exit, on another one
(exit codes 16/17 for the job scheduler), validates each rank's own values rather than
values the ranks agree on, and judges spikes against a fixed multiple of the largest of
the first N values, never skipping an update. Here a spike is a z-score against a
running window, and the remedy is to skip and, if that does not help, to roll back.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any, Optional

import torch

from megamod.config import StabilityConfig
from megamod.errors import MegamodError
from megamod.parallel import collective_device
from megamod.training.loss_scaler import LossScaler

logger = logging.getLogger("megamod")

# What `inject_spike_at` multiplies the gradient by.
_SPIKE_FACTOR = 1e6


class TrainingUnstableError(MegamodError):
    """Steps kept failing after the rollbacks allowed (exit code 2, like a bad config: the
    fix is a setting or the data)."""


class SpikeDetector:
    """One-sided z-scores of named quantities against their last `window` values."""

    def __init__(self, zscore: float, window: int) -> None:
        self.zscore = zscore
        self.window = window
        self.history: dict[str, deque[float]] = {}

    def zscores(self, values: dict[str, float]) -> dict[str, float]:
        """(value - mean) / std for each quantity whose window is full and has spread."""
        scores = {}
        for name, value in values.items():
            past = self.history.get(name, ())
            if len(past) < self.window:
                continue
            mean = sum(past) / len(past)
            std = math.sqrt(sum((x - mean) ** 2 for x in past) / len(past))
            if std > 0:
                scores[name] = (value - mean) / std
        return scores

    def spikes(self, values: dict[str, float]) -> dict[str, float]:
        """The quantities above the threshold, with their z-scores."""
        return {name: z for name, z in self.zscores(values).items() if z > self.zscore}

    def record(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.history.setdefault(name, deque(maxlen=self.window)).append(value)


class StabilityGuard:
    def __init__(self, config: StabilityConfig, loss_scaler: Optional[LossScaler]) -> None:
        self.config = config
        self.loss_scaler = loss_scaler
        self.nan_iterations = config.nan_iterations()
        self.spike_iterations = config.spike_iterations()
        self.detector = (
            SpikeDetector(config.spike_zscore, config.spike_window)
            if config.spike_zscore is not None else None
        )
        # Counts over this run.
        self.skipped = 0
        self.spikes = 0
        self.overflows = 0
        self.rollbacks = 0
        self.consecutive_skips = 0

    # ---------------------------------------------------------------- named points

    def inject(self, iteration: int, model: torch.nn.Module) -> None:
        """Fault injection: a NaN into one gradient, or every gradient scaled up, on the
        last rank at the chosen iterations (each once: a rolled-back run does not meet it
        again)."""
        last_rank = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
        if iteration in self.nan_iterations:
            self.nan_iterations.discard(iteration)
            if last_rank:
                param = next(p for p in model.parameters() if p.requires_grad)
                param.main_grad.view(-1)[0] = float("nan")
        if iteration in self.spike_iterations:
            self.spike_iterations.discard(iteration)
            if last_rank:
                for buffer in [*model.buffers, *model.expert_parallel_buffers]:
                    buffer.grad_data.mul_(_SPIKE_FACTOR)

    def skip_nonfinite(self, iteration: int, totals: torch.Tensor, model: torch.nn.Module) -> bool:
        """Whether this step's update must be skipped for a non-finite loss or gradient (or
        an fp16 overflow), on every rank alike. Collective."""
        loss_rank, grad_rank = self._first_bad_ranks(totals, model)
        if loss_rank is None and grad_rank is None:
            return False
        scaler = self.loss_scaler
        if loss_rank is None and scaler is not None and scaler.absorbs_overflow():
            before = scaler.value
            scaler.back_off()
            self.overflows += 1
            if torch.distributed.get_rank() == 0 and scaler.value != before:
                logger.info(
                    f"iteration {iteration}: fp16 gradient overflow (first on rank {grad_rank}):"
                    f" update skipped, loss scale {before:g} -> {scaler.value:g}"
                )
            return True
        if loss_rank is not None:
            what, rank = "loss", loss_rank
        else:
            what, rank = "gradient", grad_rank
            if scaler is not None:
                what += f" the fp16 loss scale ({scaler.value:g}, minimum or static) cannot absorb"
        message = f"iteration {iteration}: non-finite {what}, first seen on rank {rank}"
        if self.config.on_nonfinite == "stop":
            raise RuntimeError(f"{message} (stability.on_nonfinite=stop)")
        self._skip(message)
        return True

    def skip_spike(self, iteration: int, loss: float, grad_norm: float) -> bool:
        """Whether this step is a spike whose update must be skipped, on every rank alike
        (collective when spike detection is on). False: the update goes ahead, which ends
        a streak of skips."""
        if self.detector is None:
            self.consecutive_skips = 0
            return False
        values = self._agreed({"loss": loss, "grad_norm": grad_norm})
        spikes = self.detector.spikes(values)
        if spikes:
            self.spikes += 1
            described = ", ".join(
                f"{name} {values[name]:.4g} (z={z:.1f})" for name, z in spikes.items()
            )
            message = (
                f"iteration {iteration}: spike: {described} against the last "
                f"{self.detector.window} steps (stability.spike_zscore={self.detector.zscore:g})"
            )
            if self.config.on_spike == "skip":
                self._skip(message)
                return True
            if torch.distributed.get_rank() == 0:
                logger.warning(f"{message}: logged only (stability.on_spike=log)")
        self.detector.record(values)
        self.consecutive_skips = 0
        return False

    def rollback_due(self) -> bool:
        limit = self.config.max_consecutive_skips
        return limit is not None and self.consecutive_skips >= limit

    def start_rollback(self, iteration: int, checkpoint_dir: Optional[str]) -> None:
        """Count a rollback to `checkpoint_dir`'s latest checkpoint, or raise
        TrainingUnstableError when there is none or `max_rollbacks` are used up."""
        streak = (
            f"iteration {iteration}: {self.consecutive_skips} steps skipped in a row "
            f"(stability.max_consecutive_skips={self.config.max_consecutive_skips})"
        )
        if checkpoint_dir is None:
            raise TrainingUnstableError(
                f"{streak} and this run has no checkpoint to roll back to: set "
                f"checkpoint.save_dir and checkpoint.save_interval, or lower train.lr"
            )
        if self.rollbacks >= self.config.max_rollbacks:
            raise TrainingUnstableError(
                f"{streak} after {self.rollbacks} rollback(s) (stability.max_rollbacks="
                f"{self.config.max_rollbacks}): stopping. The last good checkpoint, the "
                f"latest in {checkpoint_dir}, is intact: lower train.lr, raise "
                f"stability.skip_batches_on_rollback, or look at the data after it"
            )
        self.rollbacks += 1
        self.consecutive_skips = 0

    def rollback_data_position(self, saved: int, failed: int, global_batch_size: int) -> int:
        """Where the data stream goes on after a rollback: `saved` and `failed` are the
        consumed-sample positions of the checkpoint and of the failed step."""
        skip = self.config.skip_batches_on_rollback
        return failed if skip is None else saved + skip * global_batch_size

    def scalars(self) -> dict[str, float]:
        """Counters for the metrics log."""
        scalars = {"train/skipped_steps": float(self.skipped)}
        if self.detector is not None:
            scalars["train/spikes"] = float(self.spikes)
        if self.config.max_consecutive_skips is not None:
            scalars["train/rollbacks"] = float(self.rollbacks)
        if self.loss_scaler is not None:
            scalars["train/loss_scale"] = self.loss_scaler.value
            scalars["train/overflow_steps"] = float(self.overflows)
        return scalars

    # ---------------------------------------------------------------------- helpers

    def _skip(self, message: str) -> None:
        self.skipped += 1
        self.consecutive_skips += 1
        if torch.distributed.get_rank() == 0:  # every rank knows: one line is enough
            logger.warning(f"{message}: update skipped on every rank ({self.skipped} so far)")

    @staticmethod
    def _first_bad_ranks(
        local_loss: torch.Tensor, model: torch.nn.Module
    ) -> tuple[Optional[int], Optional[int]]:
        """The lowest rank whose loss, and the lowest whose gradients, are not finite.
        Collective."""
        # One sum per buffer: a NaN or inf anywhere makes it non-finite (inf - inf = NaN),
        # and it reads the buffer once without the full-size mask `isfinite(...).all()`
        # writes (~4 % of a CPU benchmark step). A finite buffer summing past the dtype's
        # range is flagged too: such gradients overflow the norm anyway.
        grads_finite = torch.ones((), dtype=torch.bool, device=local_loss.device)
        for buffer in [*model.buffers, *model.expert_parallel_buffers]:
            grads_finite &= torch.isfinite(buffer.grad_data.sum())
        bad = torch.stack([~torch.isfinite(local_loss).all(), ~grads_finite])
        # Each rank offers its own rank where it saw one, else the world size (past every
        # rank): the minimum over ranks is the first that saw one. One small all-reduce and
        # one read to the host, whatever the world size.
        world_size = torch.distributed.get_world_size()
        first = torch.where(bad, torch.distributed.get_rank(), world_size)
        torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        loss_rank, grad_rank = first.tolist()
        return (
            loss_rank if loss_rank < world_size else None,
            grad_rank if grad_rank < world_size else None,
        )

    @staticmethod
    def _agreed(values: dict[str, Any]) -> dict[str, float]:
        """The largest of each value over all ranks, so every rank judges the same
        numbers. Collective."""
        tensor = torch.tensor(
            [float(v) for v in values.values()], dtype=torch.float64, device=collective_device()
        )
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return dict(zip(values, tensor.tolist()))
