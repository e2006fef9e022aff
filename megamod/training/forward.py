"""One micro-batch through the model, as megatron-core's schedules call it: the forward
step and its loss function, shared by training and evaluation; and the step's batches made
the same on every tensor-parallel rank before they go in."""

from __future__ import annotations

import logging
from functools import partial
from typing import Iterator

import torch
from megatron.core import parallel_state

from megamod.data.loader import TrainLoader
from megamod.errors import DataError
from megamod.parallel import collective_device

logger = logging.getLogger("megamod")


def loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor) -> tuple:
    """Sum of the token losses and their count; the schedule divides by the global count."""
    mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module) -> tuple:
    batch = next(data_iterator)
    output = model(
        batch["tokens"], batch["images"], batch["labels"], batch["loss_mask"],
        padding_mask=batch.get("padding_mask"), position_ids=batch.get("position_ids"),
        segment_ids=batch.get("segment_ids"),
    )
    return output, partial(loss_func, batch["loss_mask"])


def step_totals(reports: list[dict]) -> torch.Tensor:
    """[loss sum, loss tokens] of the micro-batches the schedule ran (its `reports`), summed
    over data-parallel ranks and pipeline stages: only the last stage computes the loss
    (the others report nothing and add zeros), and every rank gets the step's figures.
    Collective."""
    if reports:
        totals = torch.stack([r["lm loss"] for r in reports]).sum(0).float()
    else:
        totals = torch.zeros(2, device=collective_device())
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    return totals


def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    device = collective_device()
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def next_step_agreed(loader: TrainLoader) -> list[dict]:
    """The loader's next step, the same on every tensor-parallel rank
    (`agree_within_tensor_parallel_group`)."""
    batches = loader.next_step()
    return agree_within_tensor_parallel_group(batches, loader.last_fingerprint)


def agree_within_tensor_parallel_group(micro_batches: list[dict], fingerprint: list[int]) -> list[dict]:
    """The step's micro-batches (host tensors, as the loader gives them; `fingerprint`:
    their `step_fingerprint`) as the group's first tensor-parallel rank has them. The TP
    ranks of a data-parallel rank build the same batches independently (each reads and
    decodes the same samples): tokens that differ (one rank could not read a sample another
    could) stop the run with a DataError; images that differ (DALI failed on one rank and
    its Pillow fallback decoded the image there, with other interpolation) are replaced by
    the first rank's. One small all-gather over the TP group per step. Decoding once per TP
    group instead would need a collective in the loader's background thread, beside
    training's own collectives."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return micro_batches
    mine = torch.tensor(fingerprint, dtype=torch.int64, device=collective_device())
    group = parallel_state.get_tensor_model_parallel_group()
    digests = [torch.empty_like(mine) for _ in range(tp)]
    torch.distributed.all_gather(digests, mine, group=group)
    digests = [tuple(d.tolist()) for d in digests]
    if len({d[0] for d in digests}) > 1:
        raise DataError(
            f"the {tp} tensor-parallel ranks of data-parallel rank "
            f"{parallel_state.get_data_parallel_rank()} built different batches for the same "
            f"step (one could read a sample another could not; the skipped-sample warnings "
            f"above name it): make the data readable alike on every node, then resume"
        )
    if len({d[1:] for d in digests}) == 1:
        return micro_batches
    logger.warning("tensor-parallel ranks decoded this step's images differently (a decoder "
                   "fell back on one of them): using the first rank's")
    src = parallel_state.get_tensor_model_parallel_src_rank()
    for batch in micro_batches:
        images = batch["images"].to(collective_device())
        torch.distributed.broadcast(images, src=src, group=group)
        batch["images"] = images
    return micro_batches
