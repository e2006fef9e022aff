"""Keep a run alive through a bad step: `NonFiniteGuard`, called by the loop between
forward/backward and the optimizer step.

After megatron-core's schedule has reduced the gradients, every rank checks its own loss
and gradient buffers for NaN/Inf (one reduction per buffer, no per-parameter loop) and the
ranks exchange one flag each: if any rank saw one, every rank skips the update together,
so parameters, optimizer state and LR schedule stay as they were and stay identical across
ranks, and the log names the iteration and the first rank that saw it.
`stability.on_nonfinite: stop` raises instead (megatron-core's DDP also checks inside its
reduction then). `stability.inject_nan_at` poisons one gradient on the last rank, for tests.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from megamod.config import StabilityConfig

logger = logging.getLogger("megamod")


class NonFiniteGuard:
    def __init__(self, config: StabilityConfig) -> None:
        self.config = config
        self.nan_iterations = config.nan_iterations()
        self.skipped = 0  # steps skipped in this run

    def inject(self, iteration: int, model: torch.nn.Module) -> None:
        """Fault injection: a NaN into one gradient of the last rank at chosen iterations."""
        if iteration in self.nan_iterations and (
            torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
        ):
            param = next(p for p in model.parameters() if p.requires_grad)
            param.main_grad.view(-1)[0] = float("nan")

    def first_bad_rank(self, local_loss: torch.Tensor, model: torch.nn.Module) -> Optional[int]:
        """The lowest rank whose loss or gradients are not finite, or None. Collective."""
        finite = torch.isfinite(local_loss).all()
        for buffer in [*model.buffers, *model.expert_parallel_buffers]:
            finite &= torch.isfinite(buffer.grad_data).all()
        world = torch.distributed.get_world_size()
        flags = [torch.zeros(1, device=local_loss.device) for _ in range(world)]
        torch.distributed.all_gather(flags, (~finite).float().reshape(1))
        bad = [rank for rank, flag in enumerate(flags) if flag.item()]
        return bad[0] if bad else None

    def should_skip(self, iteration: int, local_loss: torch.Tensor, model: torch.nn.Module) -> bool:
        """Whether this step's update must be skipped (on every rank alike)."""
        rank = self.first_bad_rank(local_loss, model)
        if rank is None:
            return False
        message = f"iteration {iteration}: non-finite loss or gradient, first seen on rank {rank}"
        if self.config.on_nonfinite == "stop":
            raise RuntimeError(f"{message} (stability.on_nonfinite=stop)")
        self.skipped += 1
        if torch.distributed.get_rank() == 0:  # every rank knows: one line is enough
            logger.warning(f"{message}: update skipped on every rank ({self.skipped} so far)")
        return True
