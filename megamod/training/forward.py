"""One micro-batch through the model, as megatron-core's schedules call it: the forward
step and its loss function, shared by training and evaluation."""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch
from megatron.core import parallel_state

from megamod.parallel import collective_device


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
