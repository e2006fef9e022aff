"""One micro-batch through the model, as megatron-core's schedules call it: the forward
step and its loss function, shared by training and evaluation."""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch

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


def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    device = collective_device()
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
