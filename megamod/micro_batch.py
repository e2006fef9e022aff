"""What the LLaVA model knows about the micro-batch it runs, for the layers that need more
than their hidden states: MoE routers (token modality, padding, loss-token count) and MoD
layers (which positions are vision tokens, how many per sample, which sample of a packed
row each position belongs to). Filled once per forward by `LLaVA`, read by the layers it is
attached to; nothing in it is a parameter.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch


@dataclass
class MicroBatchInfo:
    # [s, b] bool, the whole sequence on every rank: True at `<image>` placeholder positions.
    token_is_image: Optional[torch.Tensor] = None
    # [b] int64 on the host: vision tokens per row (one host sync per micro-batch, so MoD
    # layers can size their kept-token buffers without syncing per layer).
    vision_per_sample: Optional[torch.Tensor] = None
    # [s, b] bool, True where a row holds no sample (None: no padding to leave out).
    padding: Optional[torch.Tensor] = None
    # [b] int64 on the host: padding positions per row (with `padding`).
    padding_per_sample: Optional[torch.Tensor] = None
    # Packed rows: [s, b] the sample each position belongs to (its number in the row, -1 on
    # padding), and [samples, b] on the host its vision tokens (p-MoD keeps a share of
    # each sample's vision tokens). None: one sample a row.
    segment_ids: Optional[torch.Tensor] = None
    vision_per_segment: Optional[torch.Tensor] = None
    # Modality of the tokens the next MoE router sees, in its order (sequence-major, this
    # rank's sequence-parallel slice): 1 image, 0 text, -1 padding (routed nowhere,
    # counted nowhere).
    routed_modality: Optional[torch.Tensor] = None
    # Loss tokens of the micro-batch (0-d tensor: no host sync), for the aux-loss weight.
    loss_tokens: Optional[torch.Tensor] = None

    @contextlib.contextmanager
    def routing(self, modality: torch.Tensor) -> Iterator[None]:
        """Routers inside the block see `modality` (a MoD layer's kept tokens)."""
        outer, self.routed_modality = self.routed_modality, modality
        try:
            yield
        finally:
            self.routed_modality = outer


def segment_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[s, b] sample numbers (in position order) -> [b, 1, s, s] attention mask, True =
    masked out: a query attends to the keys of its own sample at or before it. Padding (one
    segment of its own) attends within itself, so no row is empty."""
    seg = segment_ids.t()
    s = seg.shape[1]
    later = torch.ones(s, s, dtype=torch.bool, device=seg.device).triu_(1)
    return ((seg.unsqueeze(2) != seg.unsqueeze(1)) | later).unsqueeze(1)
