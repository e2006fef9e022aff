"""MoE-LLaVA's gate: DeepSpeed 0.9.5's `top2gating` (deepspeed/moe/sharded_moe.py), in
megatron-core's router terms (per-token expert probabilities and a routing map).

MoE-LLaVA builds `deepspeed.moe.layer.MoE(k=2, capacity_factor=1.5,
eval_capacity_factor=2.0, min_capacity=0)`; its `TopKGate` runs `top2gating` on the
T = batch x sequence tokens of a rank's micro-batch, sample by sample:
- `gates = softmax(logits)`; the first expert is `argmax(gates)`, the second
  `argmax(logits + Gumbel noise)` over the others, the noise drawn in training AND in
  evaluation (0.9.5 has no switch for it);
- capacity `C = ceil(T / E * 2 * capacity_factor)` (`_capacity` with
  `capacity_factor * 2`, in float32 as DeepSpeed's tensors compute it; MoE-LLaVA's
  `min_capacity` is 0), the evaluation factor when the module is not training;
- slots in token order, every first choice before every second choice: a first choice
  is kept if fewer than C earlier tokens chose that expert first; a second choice if the
  expert's first choices (all of them, kept or not) plus the earlier second choices for it
  number fewer than C (DeepSpeed's `locations2 += sum(mask1)`);
- a token's weights are its kept choices' gates, renormalised over the kept ones (`denom_s`
  clamped at eps): a token that lost one expert gets weight 1 on the other, one that lost
  both passes on the residual path alone;
- `l_aux = E^2 * mean_e(me_e * ce_e)`, `me` the mean gates, `ce` the share of tokens whose
  FIRST choice is e, before any drop (computed by `router.TopKRouterWithStats`).
`drop_tokens`, `use_rts` (random token selection) and `noisy_gate_policy` never reach
`top2gating` (`TopKGate.forward` hands them to `top1gating` only): top-2 always drops
over capacity, in token order.

How it sits in megatron-core (departures from the official code):
- Token order. megatron-core's routers see tokens sequence-major ([s, b]); DeepSpeed's
  order (sample-major) is restored for the slot counting, so the same tokens are dropped.
- Sequence parallelism. A router holds its TP rank's slice of the sequence; the two expert
  choices per token (ints) are all-gathered over the TP group, so capacity and slots are
  the whole micro-batch's, as in DeepSpeed and in a TP=1 run. Each rank keeps its own
  tokens' probabilities (and their gradients).
- The noise. DeepSpeed draws `Gumbel(0, 1).rsample(logits.shape)` from the device's
  default generator; megamod draws the same formula from megatron-core's
  `data-parallel-rng` stream (seeded alike on every rank, saved in checkpoints, replayed
  when activations are recomputed), the whole micro-batch's [b, s, E] on every TP rank, so
  a token gets the noise a TP=1 run draws for it. The numbers equal DeepSpeed's for the
  same generator state (tests/moe/test_deepspeed_gate.py). As in DeepSpeed (whose ranks
  are seeded alike), data-parallel ranks draw the same stream for their different tokens,
  so DP=2 draws other noise per token than one process running all micro-batches.
- Not reproduced: the tokens routed. MoE-LLaVA pads each batch to its longest sample (with
  zero embeddings), megamod every sample to `model.language.seq_length`; pad positions
  take slots and count in `me` and `ce` in both, so where the padding differs, so do C and
  the dropped tokens. Under p-MoD a MoE router sees only the kept tokens.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

NOISE_RNG = tensor_parallel.get_data_parallel_rng_tracker_name()


class Top2Routing(NamedTuple):
    """One micro-batch's routing, this rank's tokens in the router's order ([s*b])."""

    probs: torch.Tensor  # [T, E] combine weights (0 where not routed)
    routing_map: torch.Tensor  # [T, E] bool, the kept choices
    gates: torch.Tensor  # [T, E] softmax of the logits (the aux loss's `me`)
    first_choice: torch.Tensor  # [T, E] bool, argmax of the gates before drops (its `ce`)


def capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """DeepSpeed's `_capacity(gates, torch.tensor(capacity_factor * 2), min_capacity=0)`:
    the product is a float32 tensor's, as there (megatron-core's `get_capacity` rounds in
    float64, which can differ by one slot)."""
    return int(torch.ceil((num_tokens / num_experts) * torch.tensor(capacity_factor * 2)))


def gumbel_noise(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """DeepSpeed's `gumbel_rsample(shape)` (float32 `Gumbel(0, 1).rsample`: a uniform draw
    in [tiny, 1 - eps], then -log(-log(u))), drawn from megatron-core's `data-parallel-rng`
    tracker state, which it advances."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    states = tracker.get_states()
    generator = torch.Generator(device=device)
    generator.set_state(states[NOISE_RNG])
    uniform = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    states[NOISE_RNG] = generator.get_state()
    tracker.set_states(states)
    finfo = torch.finfo(torch.float32)
    low = torch.full((), finfo.tiny, device=device)
    high = torch.full((), 1 - finfo.eps, device=device)
    return -torch.log(-torch.log(low + uniform * (high - low)))


def top2gating(
    logits: torch.Tensor,
    capacity_factor: Optional[float],
    sequence_parallel_group: Optional[torch.distributed.ProcessGroup],
    padding: Optional[torch.Tensor] = None,
) -> Top2Routing:
    """DeepSpeed 0.9.5's `top2gating` on this rank's logits [s, b, E] (the sequence slice
    of `sequence_parallel_group`'s rank, or all of it when None). `capacity_factor` None
    drops nothing. `padding` [s, b] (True: not a token) takes no slot and is not counted
    in the capacity (with a capacity factor it is routed nowhere; without, it keeps its
    experts at weight 0, as `TopKRouterWithStats` explains), and its gates and first
    choices are zeroed (so the aux loss is the real tokens'), like DeepSpeed's
    `used_token` in its `top1gating`."""
    s_local, batch, num_experts = logits.shape
    ranks = 1 if sequence_parallel_group is None else sequence_parallel_group.size()
    rank = 0 if sequence_parallel_group is None else sequence_parallel_group.rank()
    gates = F.softmax(logits, dim=-1)
    first = gates.argmax(dim=-1)  # [s, b]
    with torch.no_grad():
        # The whole micro-batch's noise in DeepSpeed's order, then this rank's rows.
        noise = gumbel_noise((batch, s_local * ranks, num_experts), logits.device)
        noise = noise.transpose(0, 1)[rank * s_local : (rank + 1) * s_local]
        taken = F.one_hot(first, num_experts).bool()
        second = (logits + noise).masked_fill(taken, float("-inf")).argmax(dim=-1)
    keep_first, keep_second = _within_capacity(
        first, second, num_experts, capacity_factor, sequence_parallel_group, padding
    )
    first, second = first.reshape(-1, 1), second.reshape(-1, 1)
    gates = gates.reshape(-1, num_experts)
    if padding is not None:
        gates = gates * ~padding.reshape(-1, 1)
    gate1 = gates.gather(1, first).squeeze(1) * keep_first.reshape(-1)
    gate2 = gates.gather(1, second).squeeze(1) * keep_second.reshape(-1)
    denom = torch.clamp(gate1 + gate2, min=torch.finfo(gates.dtype).eps)
    mask1 = torch.zeros_like(gates).scatter(1, first, 1.0)
    mask2 = torch.zeros_like(gates).scatter(1, second, 1.0)
    probs = (gate1 / denom).unsqueeze(1) * mask1 + (gate2 / denom).unsqueeze(1) * mask2
    routing_map = (mask1 * keep_first.reshape(-1, 1) + mask2 * keep_second.reshape(-1, 1)).bool()
    first_choice = mask1.bool()
    if padding is not None:
        first_choice &= ~padding.reshape(-1, 1)
    return Top2Routing(probs, routing_map, gates, first_choice)


@torch.no_grad()
def _within_capacity(
    first: torch.Tensor,
    second: torch.Tensor,
    num_experts: int,
    capacity_factor: Optional[float],
    group: Optional[torch.distributed.ProcessGroup],
    padding: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of this rank's first and second choices ([s, b] each) keep their expert:
    DeepSpeed's slot counting over the whole micro-batch in its (sample-major) order.
    `padding` [s, b] keeps nothing and takes no slot; the capacity counts real tokens."""
    if capacity_factor is None:  # padding too keeps its experts (its gates are zeroed)
        return torch.ones_like(first, dtype=torch.bool), torch.ones_like(second, dtype=torch.bool)
    real = torch.ones_like(first, dtype=torch.bool) if padding is None else ~padding
    choices = torch.stack([first, second, real.long()], dim=-1)  # [s, b, 3]
    if group is not None:
        choices = gather_from_sequence_parallel_region(choices, group=group)  # [S, b, 3]
    ordered = choices.transpose(0, 1).reshape(-1, 3)  # DeepSpeed's tokens: [b * S, 3]
    batch, seq = choices.shape[1], choices.shape[0]
    is_real = ordered[:, 2:]
    mask1 = F.one_hot(ordered[:, 0], num_experts) * is_real
    mask2 = F.one_hot(ordered[:, 1], num_experts) * is_real
    locations1 = torch.cumsum(mask1, dim=0) - 1
    locations2 = torch.cumsum(mask2, dim=0) - 1 + mask1.sum(dim=0, keepdim=True)
    if padding is None:
        slots = capacity(seq * batch, num_experts, capacity_factor)
    else:  # on the device, as DeepSpeed's _capacity computes it: no host sync
        slots = torch.ceil(is_real.sum() / num_experts * torch.tensor(capacity_factor * 2))
    keep1 = (locations1.gather(1, ordered[:, :1]).squeeze(1) < slots) & is_real.squeeze(1).bool()
    keep2 = (locations2.gather(1, ordered[:, 1:2]).squeeze(1) < slots) & is_real.squeeze(1).bool()
    keep = torch.stack([keep1, keep2], dim=-1).reshape(batch, seq, 2).transpose(0, 1)
    s_local = first.shape[0]
    rank = 0 if group is None else group.rank()
    keep = keep[rank * s_local : (rank + 1) * s_local]
    return keep[..., 0], keep[..., 1]
