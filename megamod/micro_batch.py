"""What the LLaVA model knows about the micro-batch it runs, for the layers that need more
than their hidden states: MoE routers (token modality, loss-token count) and MoD layers
(which positions are vision tokens, how many per sample). Filled once per forward by
`LLaVA`, read by the layers it is attached to; nothing in it is a parameter.
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
    # [b] int64 on the host: vision tokens per sample (one host sync per micro-batch, so
    # MoD layers can size their kept-token buffers without syncing per layer).
    vision_per_sample: Optional[torch.Tensor] = None
    # Modality of the tokens the next MoE router sees, in its order (sequence-major, this
    # rank's sequence-parallel slice): 1 image, 0 text, -1 padding (counted nowhere).
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
