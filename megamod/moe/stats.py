"""Where the routers send tokens: expert load per MoE layer, split by modality.

MoE-LLaVA's analysis (paper section 4.4) plots, per MoE layer, the share of tokens each
expert receives, separately for text and image tokens. `RoutingStats` accumulates
exactly that while the model trains or evaluates (the router hands over its final
routing map: after capacity dropping), so it can be logged live and printed by
`megamod inspect --routing`.

Definitions (per layer): `load[e]` = expert-slots filled by expert e / all filled slots
(a distribution over experts); `dropped_fraction` = 1 - filled slots / (tokens x top-k),
the share of choices an expert's capacity refused. Image tokens are the `<image>`
placeholder positions; every other position (prompt, answer, padding) counts as text.
Padding slots a MoD layer adds to even out its kept tokens (modality -1) count nowhere.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import is_checkpointing
from megatron.core.transformer.moe import moe_utils

MODALITIES = ("text", "image")


class RoutingStats:
    """Counts of routed tokens per (layer, modality, expert), summed until `reset()`."""

    def __init__(self, layer_pattern: list[int], num_experts: int) -> None:
        self.moe_layers = [i for i, is_moe in enumerate(layer_pattern) if is_moe]
        self.num_experts = num_experts
        num_layers = len(layer_pattern)
        # [layer, modality, expert] filled slots; [layer, modality] tokens routed.
        self.counts = torch.zeros(num_layers, len(MODALITIES), num_experts, dtype=torch.float64)
        self.tokens = torch.zeros(num_layers, len(MODALITIES), dtype=torch.float64)
        # Micro-batch forwards this rank recorded per layer (to average per-step losses).
        self.forwards = torch.zeros(num_layers, dtype=torch.float64)
        self.topk = 1

    def record(
        self, layer: int, routing_map: torch.Tensor, modality: Optional[torch.Tensor], topk: int
    ) -> None:
        """routing_map: [tokens, experts] bool, this rank's tokens of one micro-batch;
        modality: [tokens] 0 text, 1 image, -1 not counted (None: all text).

        Not recorded while activation recomputation reruns the forward in backward
        (megatron-core's checkpoint flag with gradients on; its first pass runs without):
        the rerun routes the same tokens the same way, and outside the MoD layer's
        `MicroBatchInfo.routing` when only the MoE layer is recomputed."""
        if is_checkpointing() and torch.is_grad_enabled():
            return
        with torch.no_grad():
            if modality is None:
                modality = torch.zeros(routing_map.shape[0], dtype=torch.long)
            modality = modality.to(routing_map.device, torch.long).reshape(-1)
            if self.counts.device != routing_map.device:
                self.counts = self.counts.to(routing_map.device)
                self.tokens = self.tokens.to(routing_map.device)
            # Rows of uncounted tokens (-1) are zeroed, not dropped: no host sync on GPU.
            counted = (modality >= 0).to(torch.float64)
            modality = modality.clamp(min=0)
            self.counts[layer].index_add_(0, modality, routing_map.to(torch.float64) * counted[:, None])
            self.tokens[layer].index_add_(0, modality, counted)
            self.forwards[layer] += 1
            self.topk = topk

    def all_reduce(self, group: torch.distributed.ProcessGroup, device: torch.device) -> None:
        """Sum over the ranks that hold different tokens (sequence- and data-parallel
        `group`) and over the pipeline stages (each holds its own layers' rows), on the
        collectives' `device` (a stage without MoE layers recorded nothing there)."""
        packed = torch.cat([self.counts.flatten(), self.tokens.flatten()]).to(device)
        torch.distributed.all_reduce(packed, group=group)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(packed, group=parallel_state.get_pipeline_model_parallel_group())
        n = self.counts.numel()
        self.counts = packed[:n].view_as(self.counts)
        self.tokens = packed[n:].view_as(self.tokens)

    def reset(self) -> None:
        self.counts.zero_()
        self.tokens.zero_()
        self.forwards.zero_()

    def load(self, modality: Optional[str] = None) -> np.ndarray:
        """[MoE layers, experts]: each row the share of filled slots per expert."""
        counts = self.counts[self.moe_layers]
        counts = counts.sum(1) if modality is None else counts[:, MODALITIES.index(modality)]
        counts = counts.cpu().numpy()
        return counts / np.maximum(counts.sum(1, keepdims=True), 1)

    def dropped_fraction(self) -> np.ndarray:
        """[MoE layers]: the share of top-k choices refused by a full expert."""
        filled = self.counts[self.moe_layers].sum((1, 2)).cpu().numpy()
        wanted = self.tokens[self.moe_layers].sum(1).cpu().numpy() * self.topk
        return 1.0 - filled / np.maximum(wanted, 1)

    def scalars(self) -> dict[str, float]:
        """TensorBoard tags: moe/expert_load[/text|/image]/layer<i>/expert<j>, moe/dropped_fraction."""
        out: dict[str, float] = {}
        for modality in (None, *MODALITIES):
            prefix = "moe/expert_load" + (f"/{modality}" if modality else "")
            for row, layer in zip(self.load(modality), self.moe_layers):
                for expert, share in enumerate(row):
                    out[f"{prefix}/layer{layer}/expert{expert}"] = float(share)
        out["moe/dropped_fraction"] = float(self.dropped_fraction().mean())
        return out

    def loss_scalars(self, device: torch.device) -> dict[str, float]:
        """megatron-core's aux-loss tracker (unscaled load-balancing loss, 1.0 = balanced;
        z-loss) per MoE layer and their mean, averaged over the micro-batches recorded since
        the last reset, then cleared. Collective over the ranks of the step; the z-loss is
        this rank's (upstream tracks it without a reduction group). `device`: where the
        collectives' tensors live."""
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        forwards = self.forwards
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            forwards = self._pipeline_forwards(device)
            self._same_names_on_every_stage(tracker, device)
        if not tracker:
            return {}
        moe_utils.reduce_aux_losses_tracker_across_ranks()
        per_forward = 1.0 / forwards[self.moe_layers].clamp(min=1).cpu()
        out: dict[str, float] = {}
        for name, tag in (("load_balancing_loss", "moe/aux_loss"), ("z_loss", "moe/z_loss")):
            if name not in tracker:
                continue
            values = tracker[name]["values"][self.moe_layers].double().cpu() * per_forward
            out[tag] = float(values.mean())
            for layer, value in zip(self.moe_layers, values.tolist()):
                out[f"{tag}/layer{layer}"] = value
        moe_utils.clear_aux_losses_tracker()
        return out

    def _pipeline_forwards(self, device: torch.device) -> torch.Tensor:
        """Forwards per layer as the stage holding the layer counted them."""
        forwards = self.forwards.to(device)
        torch.distributed.all_reduce(forwards, op=torch.distributed.ReduceOp.MAX,
                                     group=parallel_state.get_pipeline_model_parallel_group())
        return forwards

    def _same_names_on_every_stage(self, tracker: dict, device: torch.device) -> None:
        """megatron-core all-reduces each tracked loss over the pipeline stages by name, and
        a stage without MoE layers (or without a z-loss) tracks none: it would wait in
        another collective than the others (the hang of Megatron-LM PR #3401). Every stage
        tracks the union of the names, a stage's missing ones as zeros."""
        names: list = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        torch.distributed.all_gather_object(
            names, sorted(tracker), group=parallel_state.get_pipeline_model_parallel_group())
        for name in sorted(set().union(*names) - set(tracker)):
            moe_utils.save_to_aux_losses_tracker(
                name, torch.zeros((), device=device), 1, len(self.forwards))

    def heatmap(self, cell: int = 12) -> np.ndarray:
        """An RGB image [3, H, W] for TensorBoard: layers down, experts across; panels
        all | text | image side by side; dark = few tokens, bright = many."""
        panels = []
        for modality in (None, *MODALITIES):
            load = self.load(modality) * self.num_experts / 2  # uniform share -> 0.5
            panels.append(np.clip(load, 0.0, 1.0))
            panels.append(np.full((load.shape[0], 1), np.nan))  # a gap between panels
        grid = np.concatenate(panels[:-1], axis=1)
        grid = np.kron(grid, np.ones((cell, cell)))
        gap = np.isnan(grid)
        grid = np.nan_to_num(grid)
        # A blue -> yellow ramp, readable without matplotlib.
        rgb = np.stack([grid, 0.3 + 0.6 * grid, 1.0 - grid])
        rgb[:, gap] = 1.0
        return rgb.astype(np.float32)
