"""megatron-core's TopKRouter, told about the micro-batch it routes.

The routing itself (gating, top-k, capacity dropping, aux and z losses) is upstream's.
Two things are added, fed by `MicroBatchInfo` that the LLaVA model fills before each
forward:
- every routing decision is handed to `RoutingStats` (expert load per layer and per
  modality, dropped tokens: MoE-LLaVA's routing analysis, live);
- the load-balancing loss is weighted per LOSS token of the micro-batch instead of per
  routed token, so `moe.aux_loss_coeff` means what MoE-LLaVA's `router_aux_loss_coef`
  means (the derivation is in `megamod.moe`'s docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core.transformer.moe.router import TopKRouter


@dataclass
class MicroBatchInfo:
    """Per micro-batch facts the routers cannot see in their hidden states."""

    # [tokens] in the router's order (sequence-major, this rank's SP slice): 1 = image.
    token_is_image: Optional[torch.Tensor] = None
    # Loss tokens / all tokens of the micro-batch (a 0-d tensor: no host sync).
    loss_token_fraction: Optional[torch.Tensor] = None


class TopKRouterWithStats(TopKRouter):
    """Upstream's TopKRouter plus routing statistics and per-loss-token aux weighting.

    `micro_batch` and `stats` are attached by the model after it is built; without them
    the router is exactly upstream's.
    """

    micro_batch: Optional[MicroBatchInfo] = None
    stats = None  # Optional[megamod.moe.stats.RoutingStats]

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if self.stats is not None:
            image = self.micro_batch.token_is_image if self.micro_batch is not None else None
            self.stats.record(self.layer_number - 1, routing_map, image, self.topk)
        return probs, routing_map

    def attach_and_log_load_balancing_loss(
        self,
        activation: torch.Tensor,
        aux_loss_coeff: float,
        aux_loss: torch.Tensor,
        aux_loss_name: str,
        reduce_group: torch.distributed.ProcessGroup,
        reduce_group_has_dp: bool = False,
        valid_token_count: Optional[Union[int, torch.Tensor]] = None,
    ) -> torch.Tensor:
        # Upstream multiplies the aux loss by valid_token_count (the routed tokens on this
        # rank) because the total gradient is later divided by the global number of loss
        # tokens. Scaling by this rank's share of the LOSS tokens instead makes the aux
        # term weigh coeff x aux per micro-batch against the mean LM loss, as in MoE-LLaVA.
        fraction = self.micro_batch.loss_token_fraction if self.micro_batch is not None else None
        if fraction is not None and self.calculate_per_token_loss:
            routed = valid_token_count if valid_token_count is not None else activation.shape[0]
            valid_token_count = routed * fraction
        return super().attach_and_log_load_balancing_loss(
            activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
            reduce_group_has_dp=reduce_group_has_dp, valid_token_count=valid_token_count,
        )
