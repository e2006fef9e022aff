"""What the MoD layers did, for TensorBoard: per MoD layer the share of vision tokens
actually kept (`mod/kept_ratio/layer<i>`) and the router weights over the vision tokens
(`mod/router_weight/{mean,std,min,max}/layer<i>`), summed until `reset()`.

Kept and candidate counts are host numbers the layers know without a sync; weight sums
are device tensors read once per log interval.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import is_checkpointing


class MoDStats:
    def __init__(self, mod_layers: list[int]) -> None:
        self.mod_layers = mod_layers
        self.reset()

    def reset(self) -> None:
        self.kept = dict.fromkeys(self.mod_layers, 0)
        self.candidates = dict.fromkeys(self.mod_layers, 0)
        # [sum, sum of squares, count, min, max] of the weights of vision tokens, per layer.
        self.weights: dict[int, torch.Tensor] = {}

    def record(
        self, layer: int, kept: int, candidates: int, weights: torch.Tensor, is_image: torch.Tensor
    ) -> None:
        """weights, is_image: [s, b]: the router weights of the micro-batch, which are
        vision tokens (masked, not indexed: no host sync). Not recorded while activation
        recomputation reruns the layer in backward (megatron-core's checkpoint flag with
        gradients on; its first pass runs without): the rerun keeps the same tokens."""
        if is_checkpointing() and torch.is_grad_enabled():
            return
        self.kept[layer] += kept
        self.candidates[layer] += candidates
        if candidates == 0:
            return
        with torch.no_grad():
            w, mask = weights.detach().double(), is_image.double()
            new = torch.stack([
                (w * mask).sum(), (w * w * mask).sum(), mask.sum(),
                w.masked_fill(~is_image, float("inf")).min(),
                w.masked_fill(~is_image, float("-inf")).max(),
            ])
            old = self.weights.get(layer)
            if old is not None:
                new = torch.cat([old[:3] + new[:3], old[3:4].minimum(new[3:4]), old[4:].maximum(new[4:])])
            self.weights[layer] = new

    def gather_pipeline_stages(self) -> None:
        """Take in the other pipeline stages' MoD layers (each stage records its own), so
        `scalars()` covers the whole decoder. Collective over the pipeline group; nothing
        to do without pipeline parallelism."""
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return
        own = self.mod_layers  # gathered layers stay until reset()
        mine = ({k: self.kept[k] for k in own}, {k: self.candidates[k] for k in own},
                {k: v.cpu() for k, v in self.weights.items() if k in own})
        stages: list = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        torch.distributed.all_gather_object(
            stages, mine, group=parallel_state.get_pipeline_model_parallel_group())
        for kept, candidates, weights in stages:
            self.kept.update(kept)
            self.candidates.update(candidates)
            self.weights.update(weights)

    def scalars(self) -> dict[str, float]:
        """This rank's view: every TP rank selects the same tokens; DP ranks see other
        samples, and rank 0's are what is logged (a share, comparable across ranks)."""
        out: dict[str, float] = {}
        kept = sum(self.kept.values())
        candidates = sum(self.candidates.values())
        if candidates:
            out["mod/kept_ratio"] = kept / candidates
        for layer in sorted(self.kept):
            if self.candidates[layer]:
                out[f"mod/kept_ratio/layer{layer}"] = self.kept[layer] / self.candidates[layer]
            if layer in self.weights:
                total, squares, count, low, high = self.weights[layer].tolist()
                mean = total / count
                out[f"mod/router_weight/mean/layer{layer}"] = mean
                out[f"mod/router_weight/std/layer{layer}"] = max(squares / count - mean**2, 0.0) ** 0.5
                out[f"mod/router_weight/min/layer{layer}"] = low
                out[f"mod/router_weight/max/layer{layer}"] = high
        return out
