"""Training metrics: TensorBoard scalars and a one-line JSON console log, rank 0 only."""

from __future__ import annotations

import json
import logging
import re
import sys
import warnings
from typing import Any

import torch

from megamod.parallel import is_rank_zero

logger = logging.getLogger("megamod")


# megatron-core warnings that a megamod user cannot act on (message prefixes).
_UPSTREAM_NOISE = (
    "full scope is deprecated",  # raised by TransformerConfig's own default
    "`torch.distributed.all_gather_into_tensor` is deprecated",  # megatron-core's calls
    "`torch.distributed.reduce_scatter_tensor` is deprecated",
    # torch's, raised inside dist_checkpointing's loading
    "`load_state_dict` is deprecated",
    "Please use DTensor instead",
)
# ... and those that only say a CPU has no CUDA libraries (on a GPU they are worth reading).
_CPU_NOISE = (
    "Apex is not installed",
    "Transformer Engine and Apex are not installed",
    "When using async grad allreduce it is recommended to set the environment variable CUDA",
)


def silence_upstream_warnings() -> None:
    """Keep the console to our log lines. Call before megatron-core is imported."""
    noise = _UPSTREAM_NOISE + (() if torch.cuda.is_available() else _CPU_NOISE)
    for prefix in noise:
        warnings.filterwarnings("ignore", message=re.escape(prefix))


def setup_console_logging() -> None:
    """Rank 0 logs INFO to stdout; other ranks only warnings, prefixed with their rank."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s" if rank else "%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False


class MetricsLogger:
    """Writes scalars to TensorBoard and one console line per log interval.

    As Megatron-LM does, per-step quantities (loss, grad norm, timings) are averaged over
    the steps of the interval; the rest (learning rate, running counts) is the latest value.
    """

    AVERAGED = ("train/loss", "train/grad_norm", "train/step_time", "train/tokens_per_sec",
                "train/tflops_per_step", "train/tflops_per_sec", "data/wait_fraction",
                "data/padding_fraction", "data/samples_per_step")

    def __init__(
        self, tensorboard_dir: str | None, log_interval: int, start_iteration: int = 0
    ) -> None:
        self.log_interval = log_interval
        self.tensorboard_dir = tensorboard_dir if is_rank_zero() else None
        self.writer = None
        self._sums: dict[str, float] = {}
        self._steps = 0
        self._open_writer(start_iteration)

    def _open_writer(self, start_iteration: int) -> None:
        if self.tensorboard_dir is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run hides what an earlier run of this directory logged after the
        # checkpoint it resumes from (steps it is about to log again): TensorBoard
        # readers drop events at or past purge_step written before this writer's.
        self.writer = SummaryWriter(log_dir=self.tensorboard_dir, purge_step=start_iteration + 1)

    # Per-layer / per-expert tags go to TensorBoard only; the console line stays readable.
    TENSORBOARD_ONLY = re.compile(r"/layer\d+")

    def is_log_step(self, iteration: int, force: bool = False) -> bool:
        """Whether `log(iteration, ..., force)` will write; the same answer on every rank,
        so interval-wide collectives (MoE statistics) can run on exactly these steps."""
        return force or iteration % self.log_interval == 0

    def log(
        self,
        iteration: int,
        scalars: dict[str, float],
        force: bool = False,
        images: dict[str, Any] | None = None,
    ) -> None:
        """`images`: tag -> float RGB array [3, H, W] in [0, 1], written as they are."""
        self._steps += 1
        for tag in self.AVERAGED:
            if tag in scalars:
                self._sums[tag] = self._sums.get(tag, 0.0) + scalars[tag]
        if not self.is_log_step(iteration, force):
            return
        scalars = {**scalars, **{tag: total / self._steps for tag, total in self._sums.items()}}
        self._sums, self._steps = {}, 0
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, iteration)
            for tag, image in (images or {}).items():
                self.writer.add_image(tag, image, iteration)
            self.writer.flush()
        console = {k: v for k, v in scalars.items() if not self.TENSORBOARD_ONLY.search(k)}
        logger.info(json.dumps({"iteration": iteration, **_rounded(console)}))

    def rewind(self, iteration: int) -> None:
        """The run went back to `iteration` (a stability rollback): as on a resume,
        TensorBoard hides what was logged after it, and the interval starts afresh."""
        self._sums, self._steps = {}, 0
        self.close()
        self._open_writer(iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _rounded(scalars: dict[str, Any]) -> dict[str, Any]:
    return {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in scalars.items()}
