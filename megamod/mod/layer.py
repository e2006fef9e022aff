"""The MoD decoder layer: p-MoD (arXiv 2412.04449, section 3), as a megatron-core
`TransformerLayer` that runs attention and MLP (dense or MoE) on the kept tokens only.

Per micro-batch and sample, the router scores every token (`router.TokenRouter` +
TanhNorm: weight w), and the top k = trunc(n_vision x ratio) vision tokens by w are kept
(text and padding always are). Kept tokens run the layer in their original order with
their original RoPE positions, under the layer's causal mask. Outputs (STRing, with
h = x + Attn(LN(x)) and f = MLP(LN(h)) on the kept tokens):
  kept vision  y = h + w * f      text  y = h + f      skipped vision  y = w * x.
With a zero router (w = 1) and ratio 1 this is the dense layer, exactly.

Sequence parallelism (the sequence is split over the TP ranks between layers). The rule
is exact and uses only collectives megatron-core's own layers use:
1. All-gather the layer input x over the TP group (autograd: reduce-scatter backward).
   Every rank scores every token with the same router weights, so every rank (and TP=1)
   selects the same tokens: the selection never depends on how the sequence is split.
2. The kept tokens of each sample, in position order, are padded to one length K for the
   micro-batch, a multiple of `mod.kept_length_multiple` (a multiple of the TP size) that
   does not depend on TP; padding slots point at position 0 and sit after every real
   token, so the causal mask keeps them out of every real token's attention. Rank r takes
   slots [r K/TP, (r+1) K/TP) from the gathered x: the layer's own SP collectives then
   see equal shapes on every rank.
3. The kept outputs are all-gathered back and each rank writes its own positions (skipped
   vision tokens take w * x).
Each rank uses only some router weights (its kept slots, its skipped positions): the
router's gradients are summed over TP like any sequence-parallel parameter's.
Costs per MoD layer: two all-gathers of [s or K, b, h] forward, two reduce-scatters
backward, no host synchronisation (the per-sample vision counts come from the host once per
micro-batch, `MicroBatchInfo.vision_per_sample`), no Python loop over samples or tokens.

Activation recomputation (`train.recompute_*`) is megatron-core's. `full`: the block
checkpoints whole layers, this one with them; in backward the layer reruns from its saved
input, selection included: a deterministic function of that input (any noise a MoE gate
draws comes from the RNG state the checkpoint restores), so the rerun keeps the same tokens
and routes them the same way, and the statistics are recorded in the first pass only
(`MoDStats`, `RoutingStats`). `selective`: the kept tokens run upstream's
`_forward_attention` and `_forward_mlp`, so core attention, the norms and a dense MLP are
recomputed as in a plain layer; a MoE layer recomputes itself (`moe`).

Inference (`megamod.inference`, TP=1): at prefill a MoD layer keeps tokens as in training
and caches the keys and values of those only, in a cache of its own; decode tokens are
text and run every layer against that cache (p-MoD section 3.4). Unlike the official code,
batches of prompts work: batch padding is never kept, and masks and RoPE follow each
layer's own slots (`megamod.inference.cache`).

Packed rows (`data.packing`: several samples a row, `MicroBatchInfo.segment_ids`): each
sample keeps its own top trunc(n_vision(sample) x ratio) vision tokens, and the kept tokens
attend within their sample (`PackedSeqParams` per MoD layer: its kept tokens differ; the
filler slots after a row's kept tokens are a sequence of their own), at their own
positions. The padding at a row's end (`MicroBatchInfo.padding`) is left out of the layer
like a skipped token (y = w x; no real token attends to it, no loss reads it).

Departures from the official code: ties in the router weights are broken by position
(first token first; torch.topk leaves them unspecified), the router runs in fp32, and
padding is dropped from the layer (the official code keeps it as text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.transformer_layer import TransformerLayer

from megamod.micro_batch import MicroBatchInfo, packed_seq_params
from megamod.mod.router import TokenRouter, WeightNorm
from megamod.mod.stats import MoDStats


@dataclass
class KeptTokens:
    """One layer's selection for one micro-batch ([s, b] / [K, b] layouts, sequence first)."""

    index: torch.Tensor  # [K, b] position of each slot (0 in padding slots)
    valid: torch.Tensor  # [K, b] a real kept token (not padding)
    slot: torch.Tensor  # [s, b] slot of each position, -1 where skipped
    kept_vision: int  # vision tokens kept in the micro-batch (host)
    # Packed rows: [samples, b] kept tokens of each sample (host), in slot order.
    kept_per_segment: Optional[torch.Tensor] = None


def select_kept_tokens(
    weights: torch.Tensor,
    is_image: torch.Tensor,
    vision_per_sample: torch.Tensor,
    ratio: float,
    multiple: int,
    padding: Optional[torch.Tensor] = None,
    padding_per_sample: Optional[torch.Tensor] = None,
    segment_ids: Optional[torch.Tensor] = None,
    tokens_per_segment: Optional[torch.Tensor] = None,
    vision_per_segment: Optional[torch.Tensor] = None,
) -> KeptTokens:
    """weights, is_image: [s, b]; vision_per_sample: [b] on the host. Per sample keep the
    top trunc(n_vision x ratio) vision tokens by weight (ties: the earlier position) and
    every other token but `padding` ([s, b], its per-row count on the host: a row's unused
    end in training, a batch of left-padded prompts at inference, which no layer needs).

    Packed rows (`segment_ids` [s, b], the sample of each position, -1 on padding, and
    `tokens_per_segment`, `vision_per_segment` [samples, b] on the host): each sample of a
    row keeps its own top trunc(n_vision(sample) x ratio), as it would alone in a row; its
    kept tokens take consecutive slots."""
    s, b = is_image.shape
    device = is_image.device
    # trunc(n x ratio) in float32, as the official code computes it.
    per_sample = vision_per_sample.unsqueeze(0) if segment_ids is None else vision_per_segment
    keep_vision = torch.trunc(per_sample.to(torch.float32) * ratio).long()  # [samples, b]
    kept_per_sample = s - vision_per_sample + keep_vision.sum(0)
    if padding is not None:
        kept_per_sample = kept_per_sample - padding_per_sample
    length = math.ceil(int(kept_per_sample.max()) / multiple) * multiple
    keep_vision_dev = keep_vision.to(device, non_blocking=True)
    kept_per_sample_dev = kept_per_sample.to(device, non_blocking=True)

    positions = torch.arange(s, device=device).unsqueeze(1).expand(s, b)
    # Rank of each vision token within its sample, best weight first.
    scores = weights.float().masked_fill(~is_image, float("-inf"))
    by_weight = torch.argsort(scores, dim=0, descending=True, stable=True)
    if segment_ids is None:
        rank = torch.empty_like(by_weight).scatter_(0, by_weight, positions)
        quota = keep_vision_dev
    else:
        rank = _rank_within_segments(by_weight, segment_ids)
        quota = keep_vision_dev.gather(0, segment_ids.clamp(min=0))
    kept = ~is_image | (rank < quota)
    if padding is not None:
        kept &= ~padding
    # Kept positions first, each group in position order: a slot per kept token.
    by_slot = torch.argsort(torch.where(kept, positions, positions + s), dim=0)
    slot = torch.empty_like(by_slot).scatter_(0, by_slot, positions)
    slot = slot.masked_fill(~kept, -1)
    if length > s:
        by_slot = torch.cat([by_slot, by_slot.new_zeros(length - s, b)])
    valid = torch.arange(length, device=device).unsqueeze(1) < kept_per_sample_dev.unsqueeze(0)
    index = by_slot[:length].masked_fill(~valid, 0)
    kept_per_segment = None
    if segment_ids is not None:
        kept_per_segment = tokens_per_segment - vision_per_segment + keep_vision
    return KeptTokens(index, valid, slot, int(keep_vision.sum()), kept_per_segment)


def _rank_within_segments(by_weight: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Each position's rank [s, b] in the `by_weight` order [s, b] (positions, best first)
    among the positions of its own segment. A stable sort by segment of that order groups
    each segment's positions, best first; a position's rank is its place in the group."""
    s, b = segment_ids.shape
    segment_by_weight = segment_ids.gather(0, by_weight)
    by_segment = torch.argsort(segment_by_weight, dim=0, stable=True)
    order = by_weight.gather(0, by_segment)
    segment_sorted = segment_by_weight.gather(0, by_segment) + 1  # padding (-1) -> 0
    sizes = torch.zeros(s + 1, b, dtype=torch.long, device=segment_ids.device)
    sizes.scatter_add_(0, segment_ids + 1, torch.ones_like(segment_ids))
    group_start = (sizes.cumsum(0) - sizes).gather(0, segment_sorted)
    places = torch.arange(s, device=segment_ids.device).unsqueeze(1) - group_start
    return torch.empty_like(order).scatter_(0, order, places)


def _gather_seq(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [s, b, ...] at index [k, b] -> [k, b, ...], as whole rows of x's [s x b] rows:
    `index_select` (backward: `index_add`) costs about half of an element-wise `gather`
    (backward: `scatter_add`) on CPU, forward and backward."""
    s, b = x.shape[:2]
    rows = (index * b + torch.arange(b, device=index.device)).reshape(-1)
    return x.reshape(s * b, *x.shape[2:]).index_select(0, rows).reshape(*index.shape, *x.shape[2:])


class MoDTransformerLayer(TransformerLayer):
    """A TransformerLayer with p-MoD token selection; its own parameters keep the dense
    layer's names (a dense checkpoint loads into it), plus `mod_router`."""

    def __init__(
        self,
        *args: Any,
        ratio: float,
        weight_norm: str = "tanh_0.2_1",
        kept_length_multiple: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.ratio = ratio
        self.weight_norm = WeightNorm(weight_norm)
        self.kept_length_multiple = kept_length_multiple
        self.mod_router = TokenRouter(self.config.hidden_size, self.config.sequence_parallel)
        # Attached by the model after it is built; without them this is a plain layer.
        self.micro_batch: Optional[MicroBatchInfo] = None
        self.stats: Optional[MoDStats] = None
        # STRing's weight per kept slot [K, b], while `_forward_kept` runs the MLP.
        self._mlp_weight: Optional[torch.Tensor] = None

    def forward(self, hidden_states: torch.Tensor, rotary_pos_emb=None, **kwargs: Any):
        info = self.micro_batch
        cache = kwargs.get("inference_context")
        if cache is not None and not self.training:
            return self._forward_cached(hidden_states, cache, **kwargs)
        if info is None or info.token_is_image is None:
            return super().forward(hidden_states=hidden_states, rotary_pos_emb=rotary_pos_emb, **kwargs)
        sp = self.config.sequence_parallel
        x_full = gather_from_sequence_parallel_region(hidden_states) if sp else hidden_states
        weights, kept = self._select(x_full, self.kept_length_multiple)

        # This rank's share of the kept slots (all of them without SP).
        index, valid = kept.index, kept.valid
        positions = slice(None)
        if sp:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            rank = parallel_state.get_tensor_model_parallel_rank()
            index, valid = index.chunk(tp)[rank], valid.chunk(tp)[rank]
            s_local = hidden_states.shape[0]
            positions = slice(rank * s_local, (rank + 1) * s_local)
        if rotary_pos_emb is not None:  # [s, 1 | b, 1, d] -> each kept token's own: [K, b, 1, d]
            rotary_pos_emb = (rotary_pos_emb[:, 0][kept.index] if rotary_pos_emb.shape[1] == 1
                              else _gather_seq(rotary_pos_emb, kept.index))
        if info.segment_ids is not None:  # packed rows: kept tokens attend within their sample
            kwargs["packed_seq_params"] = packed_seq_params(kept.kept_per_segment, kept.index.shape[0])
        y_kept, context = self._forward_kept(
            x_full, weights, index, valid, rotary_pos_emb=rotary_pos_emb, **kwargs
        )
        if sp:
            y_kept = gather_from_sequence_parallel_region(y_kept)
        return self._merge(y_kept, kept.slot[positions], weights[positions], hidden_states), context

    def _select(self, x_full: torch.Tensor, multiple: int, **padding: Any) -> tuple[torch.Tensor, KeptTokens]:
        """Router weights [s, b] (fp32) and the kept tokens of the whole sequence (without
        the micro-batch's padding, unless `padding` gives another)."""
        info = self.micro_batch
        weights = self.weight_norm(self.mod_router(x_full))
        if not padding and info.padding is not None:
            padding = {"padding": info.padding, "padding_per_sample": info.padding_per_sample}
        kept = select_kept_tokens(
            weights.detach(), info.token_is_image, info.vision_per_sample, self.ratio, multiple,
            segment_ids=info.segment_ids, tokens_per_segment=info.tokens_per_segment,
            vision_per_segment=info.vision_per_segment, **padding,
        )
        if self.stats is not None:
            self.stats.record(self.layer_number - 1, kept.kept_vision,
                              int(info.vision_per_sample.sum()), weights, info.token_is_image)
        return weights, kept

    def _forward_kept(
        self,
        x_full: torch.Tensor,
        weights: torch.Tensor,
        index: torch.Tensor,
        valid: torch.Tensor,
        **attention_kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        """The layer on the kept slots `index` [K, b] of x_full: STRing's outputs [K, b, h].

        Attention and MLP are upstream's `_forward_attention` and `_forward_mlp`, so
        `train.recompute_*` applies to them as to a plain layer (core attention, norms and
        a dense MLP recomputed by megatron-core); `_forward_post_mlp` weights the MLP's
        output by w before the residual add."""
        attention_kwargs.pop("padding_mask", None)  # the row's; the MLP gets the slots'
        h, context = self._forward_attention(_gather_seq(x_full, index), **attention_kwargs)
        slot_is_image = _gather_seq(self.micro_batch.token_is_image, index) & valid
        modality = slot_is_image.long().masked_fill(~valid, -1)  # MoE routers: padding not counted
        self._mlp_weight = torch.where(slot_is_image, _gather_seq(weights, index), 1.0)
        try:
            with self.micro_batch.routing(modality.reshape(-1)):
                # Filler slots are padding to a MoE layer ([b, K]: its argument's layout).
                return self._forward_mlp(h, padding_mask=(~valid).t()), context
        finally:
            self._mlp_weight = None

    def _forward_post_mlp(self, mlp_output_with_bias: tuple, residual: torch.Tensor):
        """Upstream's residual add of the MLP output (with its pre-MLP norm's recompute
        hook), of w * MLP(LN(h)) on kept slots: kept vision h + w f, text h + f."""
        if self._mlp_weight is None:  # the plain layer (no micro-batch info, KV-cache decode)
            return super()._forward_post_mlp(mlp_output_with_bias, residual)
        f, bias = mlp_output_with_bias
        if bias is not None:
            f = f + bias
        weighted = self._mlp_weight.to(f.dtype).unsqueeze(-1) * f
        return super()._forward_post_mlp((weighted, None), residual)

    @staticmethod
    def _merge(
        y_kept: torch.Tensor, slot: torch.Tensor, weights: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        """Back to the positions: kept tokens from y_kept, skipped vision tokens w * x.

        One sum, w' x + y_kept[slot] with w' = 0 at kept positions and a zero row of y_kept
        read at skipped ones: exact (for finite x) and, backward included, about half the
        cost of gathering every position and choosing with `torch.where`."""
        s, b = slot.shape
        kept = slot >= 0
        rows = torch.where(kept, slot * b + torch.arange(b, device=slot.device), y_kept.shape[0] * b)
        hidden = y_kept.shape[-1]
        source = torch.cat([y_kept.reshape(-1, hidden), y_kept.new_zeros(1, hidden)])
        from_kept = source.index_select(0, rows.reshape(-1)).reshape(s, b, hidden)
        return weights.masked_fill(kept, 0.0).to(x.dtype).unsqueeze(-1) * x + from_kept

    def _forward_cached(self, hidden_states: torch.Tensor, cache: Any, **kwargs: Any):
        """Inference with a KV cache (`megamod.inference.cache.KVCache`; TP=1, no SP).

        Prefill (the layer has no cache yet): select the kept tokens as in training (no
        padding to a multiple: the cache holds exactly the kept tokens, p-MoD section 3.4),
        give this layer a cache of its own sized for them and the tokens still to come,
        and run the kept tokens against it. Decode: the new tokens are text, which every
        layer runs; they attend to this layer's cache, in its own slots and positions."""
        for own in ("attention_mask", "rotary_pos_emb"):  # the dense layers' layout, not ours
            kwargs.pop(own, None)
        layout = cache.layouts.get(self.layer_number)
        if layout is not None:
            with cache.in_layout(layout, hidden_states.shape[0]) as (mask, rotary):
                return super().forward(
                    hidden_states=hidden_states, attention_mask=mask, rotary_pos_emb=rotary, **kwargs
                )
        weights, kept = self._select(hidden_states, multiple=1, padding=cache.prompt_padding,
                                     padding_per_sample=cache.prompt_padding_per_sample)
        layout = cache.add_layout(self.layer_number, self.self_attention, kept.index, kept.valid,
                                  hidden_states.dtype)
        with cache.in_layout(layout, kept.index.shape[0]) as (mask, rotary):
            y_kept, context = self._forward_kept(
                hidden_states, weights, kept.index, kept.valid,
                attention_mask=mask, rotary_pos_emb=rotary, **kwargs
            )
        return self._merge(y_kept, kept.slot, weights, hidden_states), context
