"""megatron-core's TopKRouter, told about the micro-batch it routes.

The routing itself (gating, top-k, capacity dropping, aux and z losses) is upstream's.
Added, fed by `MicroBatchInfo` that the LLaVA model fills before each forward:
- every routing decision is handed to `RoutingStats` (expert load per layer and per
  modality, dropped tokens: MoE-LLaVA's routing analysis, live);
- the load-balancing and z losses are weighted per LOSS token of the micro-batch instead
  of per routed token, so `moe.aux_loss_coeff` means what MoE-LLaVA's
  `router_aux_loss_coef` means (the derivation is in `megamod.moe`'s docstring);
- megatron-core 0.16.1 weights both losses 1/TP too little under sequence parallelism
  (each TP rank scales its partial loss by its own token count, then the router's
  gradients are summed over TP); fixed as upstream later did (Megatron-LM PR #5047:
  multiply by the TP x CP group size). tests/moe/test_parallel.py shows TP=2+SP equal to
  TP=1 with both losses on.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    save_to_aux_losses_tracker,
    z_loss_func,
)
from megatron.core.transformer.moe.router import TopKRouter

from megamod.models.micro_batch import MicroBatchInfo


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
            modality = self.micro_batch.routed_modality if self.micro_batch is not None else None
            self.stats.record(self.layer_number - 1, routing_map, modality, self.topk)
        return probs, routing_map

    def _loss_token_weight(self, routed_tokens: Union[int, torch.Tensor]) -> Union[int, torch.Tensor]:
        """What a rank's (partial) aux loss is multiplied by before megatron-core divides
        every gradient by the global number of loss tokens. Upstream's later fix: the
        micro-batch's routed tokens (this rank's x the TP x CP size; each rank's loss is
        its share). MoE-LLaVA's weight, used when the model says it: the micro-batch's
        loss tokens, making the total `coeff x aux` per micro-batch next to its mean LM
        loss, however many tokens were routed (MoD routes only the kept ones)."""
        loss_tokens = self.micro_batch.loss_tokens if self.micro_batch is not None else None
        return routed_tokens * self.tp_cp_group.size() if loss_tokens is None else loss_tokens

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
        # Upstream multiplies the aux loss by valid_token_count; hand it the full weight.
        if self.calculate_per_token_loss:
            routed = valid_token_count if valid_token_count is not None else activation.shape[0]
            valid_token_count = self._loss_token_weight(routed)
        return super().attach_and_log_load_balancing_loss(
            activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
            reduce_group_has_dp=reduce_group_has_dp, valid_token_count=valid_token_count,
        )

    def apply_z_loss(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Upstream's ST-MoE z-loss, attached with `_loss_token_weight` (the only change)."""
        if self.config.moe_z_loss_coeff is None or not self.training or not torch.is_grad_enabled():
            return logits
        # Each TP/CP rank holds part of the tokens: average its partial z-loss over them.
        moe_z_loss_coeff = self.config.moe_z_loss_coeff / self.tp_cp_group.size()
        z_loss = z_loss_func(logits, moe_z_loss_coeff, padding_mask=padding_mask)
        if self.calculate_per_token_loss:
            routed = (~padding_mask).sum() if padding_mask is not None else logits.shape[0]
            logits = MoEAuxLossAutoScaler.apply(logits, z_loss * self._loss_token_weight(routed))
        else:
            logits = MoEAuxLossAutoScaler.apply(logits, z_loss)
        save_to_aux_losses_tracker(
            "z_loss", z_loss / moe_z_loss_coeff, self.layer_number, self.config.num_layers
        )
        return logits
