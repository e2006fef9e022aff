"""megatron-core's TopKRouter, told about the micro-batch it routes and the gate to use.

With `moe.gate=megatron` the routing itself (gating, top-k, capacity dropping, aux and z
losses) is upstream's; with `moe.gate=deepspeed_top2` the top-2 choice, capacity dropping,
weights and aux loss are MoE-LLaVA's DeepSpeed gate (`megamod.moe.deepspeed_gate`), on
upstream's gating linear, z-loss and aux-loss attachment. Either way the capacity factor
is `moe.capacity_factor` while training and `moe.eval_capacity_factor` otherwise
(DeepSpeed's rule; upstream uses one factor for both).
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

import contextlib
from typing import Iterator, Optional, Union

import torch
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    apply_router_token_dropping,
    get_capacity,
    get_tokens_per_expert_and_token_count,
    save_to_aux_losses_tracker,
    switch_load_balancing_loss_func,
    z_loss_func,
)
from megatron.core.transformer.moe.router import TopKRouter

from megamod.config import MoEConfig
from megamod.micro_batch import MicroBatchInfo
from megamod.moe import deepspeed_gate


class TopKRouterWithStats(TopKRouter):
    """Upstream's TopKRouter plus routing statistics, per-loss-token aux weighting, an
    evaluation capacity factor and MoE-LLaVA's DeepSpeed gate.

    `micro_batch`, `stats` and `moe` (the run's `moe` config: gate and evaluation capacity)
    are attached by the model after it is built; without them the router is exactly
    upstream's.
    """

    micro_batch: Optional[MicroBatchInfo] = None
    stats = None  # Optional[megamod.moe.stats.RoutingStats]
    moe: Optional[MoEConfig] = None

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """`padding_mask` [s, b] (True: padding), from the MoE layer's argument: the model
        passes a row's padding, a MoD layer its filler slots; an argument, so that
        megatron-core's recomputation of the layer replays it."""
        if self.moe is not None and self.moe.gate == "deepspeed_top2":
            probs, routing_map = self._deepspeed_top2(logits, padding_mask)
        elif padding_mask is None:
            with self._capacity_factor_in_config(self.capacity_factor()):
                probs, routing_map = super().routing(logits)
        else:
            probs, routing_map = self._route_without_padding(logits, padding_mask)
        if self.stats is not None:
            modality = self.micro_batch.routed_modality if self.micro_batch is not None else None
            self.stats.record(self.layer_number - 1, routing_map, modality, self.topk)
        return probs, routing_map

    def capacity_factor(self) -> Optional[float]:
        """The training capacity factor while training, else `moe.eval_capacity_factor`
        (None: no dropping)."""
        if self.training or self.moe is None:
            return self.config.moe_expert_capacity_factor
        return self.moe.eval_capacity_factor

    def _route_without_padding(
        self, logits: torch.Tensor, padding_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Upstream's routing with its padding mask (the aux and z losses leave padding
        out) and padding's weights zeroed. Without a capacity factor padding still passes
        through its experts (weight 0, counted nowhere): every TP rank then hands the
        experts as many tokens, which megatron-core's expert-TP all-gather needs on gloo.
        With one, padding is routed nowhere and the capacity dropping is applied after
        that, to the real tokens, with the capacity of the real tokens: upstream's routing
        drops before it knows the padding, which would take slots and count in the
        capacity. One host sync (the real-token count) where a capacity factor is set."""
        with self._capacity_factor_in_config(None):
            probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        real = ~padding_mask.reshape(-1, 1)
        probs = probs * real
        factor = self.capacity_factor()
        if factor is None:
            return probs, routing_map
        routing_map = routing_map & real
        num_tokens = routing_map.shape[0]
        capacity = get_capacity(int(real.sum()) * self.topk, self.num_experts, factor)
        # apply_router_token_dropping computes ceil(num_tokens x topk / E x factor): a factor
        # that makes that ceil exactly `capacity` (the 0.5 absorbs float rounding).
        exact = (capacity - 0.5) * self.num_experts / (num_tokens * self.topk)
        return apply_router_token_dropping(
            probs, routing_map, router_topk=self.topk, capacity_factor=exact,
            drop_policy=self.config.moe_token_drop_policy,
            pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
        )

    @contextlib.contextmanager
    def _capacity_factor_in_config(self, factor: Optional[float]) -> Iterator[None]:
        """Upstream's routing reads the (shared) TransformerConfig's factor: hand it this
        forward's, and restore the training one for the dispatcher and the other layers."""
        config = self.config
        training_factor = config.moe_expert_capacity_factor
        config.moe_expert_capacity_factor = factor
        try:
            yield
        finally:
            config.moe_expert_capacity_factor = training_factor

    def _deepspeed_top2(
        self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MoE-LLaVA's gate (`deepspeed_gate.top2gating`) with its first-choice aux loss;
        upstream's z-loss (0 in MoE-LLaVA) still applies. Padding takes no slot and counts
        in neither loss nor in the capacity (`top2gating`'s `padding`)."""
        seq_length, batch = logits.shape[:2]
        flat_padding = None if padding_mask is None else padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits.view(-1, self.num_experts), padding_mask=flat_padding)
        sp_group = self.tp_group if self.config.sequence_parallel else None
        routing = deepspeed_gate.top2gating(
            logits.view(seq_length, batch, self.num_experts), self.capacity_factor(), sp_group,
            padding=padding_mask,
        )
        probs = routing.probs
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            probs = self._apply_first_choice_aux_loss(
                probs, routing.gates, routing.first_choice, with_padding=padding_mask is not None
            )
        return probs, routing.routing_map

    def _apply_first_choice_aux_loss(
        self, probs: torch.Tensor, gates: torch.Tensor, first_choice: torch.Tensor, with_padding: bool
    ) -> torch.Tensor:
        """DeepSpeed's `l_aux = E^2 * mean(me * ce)` = upstream's `_apply_aux_loss` with the
        first choices as the routing map and top-1 (`E * sum_e P_e * f_e`, `f_e` the share
        of first choices): each TP rank's share of `P`, the micro-batch's `f`. With padding
        (its gates and first choices zeroed by `top2gating`), over the real tokens only."""
        coeff = self.get_aux_loss_coeff("aux_loss")
        tokens_per_expert, local_tokens, total_tokens = get_tokens_per_expert_and_token_count(
            first_choice, self.tp_cp_group, topk=1, with_padding_mask=with_padding
        )
        aux_loss = switch_load_balancing_loss_func(
            gates, tokens_per_expert, total_tokens, topk=1, num_experts=self.num_experts,
            moe_aux_loss_coeff=coeff, fused=self.config.moe_router_fusion,
        )
        return self.attach_and_log_load_balancing_loss(
            probs, coeff, aux_loss, "load_balancing_loss", self.tp_cp_group,
            valid_token_count=local_tokens,
        )

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
        """Upstream's ST-MoE z-loss, attached with `_loss_token_weight`, and with padding
        exact under sequence parallelism: upstream averages each rank's z-loss over that
        rank's real tokens and divides by the TP x CP size, which is the mean over the
        micro-batch only when every rank holds as many real tokens (a row's padding sits
        at its end: on the last ranks). Each rank's mean is weighted by its share of the
        real tokens instead (one all-reduce of a count)."""
        if self.config.moe_z_loss_coeff is None or not self.training or not torch.is_grad_enabled():
            return logits
        # Each TP/CP rank holds part of the tokens: average its partial z-loss over them.
        group_size = self.tp_cp_group.size()
        moe_z_loss_coeff = self.config.moe_z_loss_coeff / group_size
        z_loss = z_loss_func(logits, moe_z_loss_coeff, padding_mask=padding_mask)
        if padding_mask is not None and group_size > 1:
            real = (~padding_mask).sum().to(z_loss.dtype)
            total = real.clone()
            torch.distributed.all_reduce(total, group=self.tp_cp_group)
            z_loss = z_loss * (real * group_size / total.clamp(min=1))
        if self.calculate_per_token_loss:
            routed = (~padding_mask).sum() if padding_mask is not None else logits.shape[0]
            logits = MoEAuxLossAutoScaler.apply(logits, z_loss * self._loss_token_weight(routed))
        else:
            logits = MoEAuxLossAutoScaler.apply(logits, z_loss)
        save_to_aux_losses_tracker(
            "z_loss", z_loss / moe_z_loss_coeff, self.layer_number, self.config.num_layers
        )
        return logits
