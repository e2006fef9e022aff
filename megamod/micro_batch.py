"""What the LLaVA model knows about the micro-batch it runs, for the layers that need more
than their hidden states: MoE routers (token modality, padding, loss-token count) and MoD
layers (which positions are vision tokens, how many per sample, which sample of a packed
row each position belongs to). Filled once per forward by `LLaVA`, read by the layers it is
attached to; nothing in it is a parameter.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams


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
    # padding), and [samples, b] on the host its tokens (attention stays within each sample)
    # and its vision tokens (p-MoD keeps a share of each sample's vision tokens). None: one
    # sample a row.
    segment_ids: Optional[torch.Tensor] = None
    tokens_per_segment: Optional[torch.Tensor] = None
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


def packed_seq_params(lengths: torch.Tensor, row_length: int) -> PackedSeqParams:
    """Packed rows for core attention: `lengths` [samples, b] on the host, the tokens of each
    sample of each row in row order (0 past a row's last sample), samples laid from each
    row's start -> megatron-core's `PackedSeqParams` over the b rows laid end to end (row r
    holds positions [r x row_length, (r + 1) x row_length), the layout TE's `thd` format
    flattens to), `sbhd` format: the tensors stay [s, b, ...], and only core attention reads
    it (`SDPADotProductAttention`: causal attention within each sequence).

    A row's end past its samples (padding, a MoD layer's filler slots) is a sequence of its
    own (no real token attends to it, no loss reads it; as its own sequence it costs less
    than joined to the last sample, and each sample's kernel call sees just that sample); a
    row without samples is one sequence. `cu_seqlens` are int32 host tensors (read without
    a device sync); `max_seqlen` is the longest sequence.
    """
    bounds = [0]
    for r, row in enumerate(lengths.t().tolist()):
        ends = list(itertools.accumulate(n for n in row if n > 0))
        if ends and ends[-1] > row_length:
            raise ValueError(f"row {r} holds {ends[-1]} tokens of samples in {row_length} positions")
        if not ends or ends[-1] < row_length:
            ends.append(row_length)
        bounds += [r * row_length + end for end in ends]
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    longest = max(end - start for start, end in zip(bounds, bounds[1:]))
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)
