"""The KV cache of generation: megatron-core's static inference context, with a layout per
layer so p-MoD's layers cache only the tokens they keep.

megatron-core's `StaticInferenceContext` gives every layer one buffer
[max_sequence_length, batch, groups, head_dim] and one `sequence_len_offset` for all of
them: token k of every sample sits in slot k of every layer. Its attention writes the new
keys and values at the offset, reads slots [0, offset + n), and applies RoPE to the read
keys with `rotary_pos_emb[:offset + n]` (keys are cached before RoPE). `KVCache` keeps all
of that and adds what p-MoD needs (paper section 3.4: at prefill each MoD layer caches the
keys and values of its kept tokens only):

- A `CacheLayout` per cache: which position each slot holds and whether it holds a real
  token. The dense layers share one; each MoD layer makes its own at prefill, sized for
  its kept tokens plus the tokens still to be generated, and allocates its own buffers
  (megatron-core's attention then finds them and never allocates the full length).
- While a layer runs, the offset is that layer's slot count (`in_layout`), and the layer
  gets its layout's mask and per-slot RoPE: [capacity, b, 1, d], one position per slot and
  sample, which megatron-core's attention slices as it slices its own table.
- Batches (the official p-MoD code assumes batch 1): prompts are left-padded to one
  length, so every sample's next token goes to the same slot of a layout; padding slots
  (batch padding, and MoD's padding of samples that keep fewer tokens) are masked out of
  every attention, and RoPE positions count each sample's own tokens only. A sample in a
  batch therefore computes what it computes alone.

Masks follow megatron-core's convention (True = masked out), causal in slot order (slots
are in position order, padding last or first); without padding there is none to pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from megatron.core.inference.contexts import StaticInferenceContext


@dataclass
class CacheLayout:
    """What each slot of one cache holds ([capacity, b], sequence first)."""

    positions: torch.Tensor  # RoPE position of the token in each slot
    valid: torch.Tensor  # the slot holds a real token (not padding)
    rotary: Optional[torch.Tensor]  # [capacity, b, 1, d]: RoPE of each slot's position
    length: int = 0  # slots written

    def __post_init__(self) -> None:
        # Padding only ever sits in the prompt's slots, which every step's keys cover:
        # known once (a host sync here, none per layer and step).
        self.padded = not bool(self.valid.all())

    def attention_mask(self, start: int, end: int) -> Optional[torch.Tensor]:
        """[b, 1, end - start, end], True = masked: queries in slots [start, end) see the
        real tokens in slots up to their own. None where no slot is padding: then the
        attention's own mask type says exactly that (causal at prefill, where the queries
        are all the keys; nothing to mask for decode's single query), which lets the
        attention take its causal fast path (and transformer-engine, which ignores
        explicit masks, compute the right thing)."""
        if not self.padded:
            return None
        slots = torch.arange(end, device=self.valid.device)
        causal = slots.unsqueeze(0) <= slots[start:end].unsqueeze(1)  # [n, end]
        allowed = causal.unsqueeze(0) & self.valid[:end].t().unsqueeze(1)  # [b, n, end]
        return ~allowed.unsqueeze(1)


class KVCache(StaticInferenceContext):
    """megatron-core's static inference context for one batch of prompts.

    `prompt_positions`, `prompt_valid`: [s, b], the left-padded prompts' RoPE positions
    and real-token flags. Room is made for `max_new_tokens - 1` more tokens (the last new
    token is never fed back). `rotary_table` is the model's RoPE table [P, 1, 1, d] for
    positions 0..P-1 (None: no RoPE)."""

    def __init__(
        self,
        prompt_positions: torch.Tensor,
        prompt_valid: torch.Tensor,
        max_new_tokens: int,
        rotary_table: Optional[torch.Tensor],
    ) -> None:
        s, b = prompt_positions.shape
        fed_back = max(max_new_tokens - 1, 0)
        super().__init__(max_batch_size=b, max_sequence_length=s + fed_back)
        steps = torch.arange(1, fed_back + 1, device=prompt_positions.device).unsqueeze(1)
        self._decode_positions = prompt_positions[-1:] + steps  # [fed_back, b]
        self.rotary_table = rotary_table
        self.dense = self._layout(prompt_positions, prompt_valid)
        # Batch padding, which MoD layers leave out of their caches (count on the host).
        self.prompt_padding = ~prompt_valid
        self.prompt_padding_per_sample = self.prompt_padding.sum(0).cpu()
        self.layouts: dict[int, CacheLayout] = {}  # by layer number: the MoD layers'

    def _layout(self, positions: torch.Tensor, valid: torch.Tensor) -> CacheLayout:
        """A layout holding the given prompt slots, then the tokens to be generated."""
        positions = torch.cat([positions, self._decode_positions])
        valid = torch.cat([valid, torch.ones_like(self._decode_positions, dtype=torch.bool)])
        rotary = None if self.rotary_table is None else self.rotary_table[:, 0][positions]
        return CacheLayout(positions, valid, rotary)

    def add_layout(
        self,
        layer_number: int,
        attention: torch.nn.Module,
        index: torch.Tensor,
        valid: torch.Tensor,
        dtype: torch.dtype,
    ) -> CacheLayout:
        """A layer's own cache, holding the prompt slots `index` [K, b] (`valid`: False at
        padding), with buffers allocated by megatron-core's attention for exactly them and
        the tokens to come."""
        layout = self._layout(
            self.dense.positions.gather(0, index), valid & self.dense.valid.gather(0, index)
        )
        capacity, batch = layout.positions.shape
        self.key_value_memory_dict[layer_number] = (
            attention._allocate_memory(capacity, batch, attention.key_hidden_size, dtype),
            attention._allocate_memory(capacity, batch, attention.val_hidden_size, dtype),
        )
        self.layouts[layer_number] = layout
        return layout

    @contextlib.contextmanager
    def in_layout(
        self, layout: CacheLayout, new_tokens: int
    ) -> Iterator[tuple[Optional[torch.Tensor], Optional[tuple[torch.Tensor, torch.Tensor]]]]:
        """While `new_tokens` tokens run against `layout`: the offset is its slot count;
        yields their attention mask and RoPE. The slots count as written afterwards."""
        start, outer = layout.length, self.sequence_len_offset
        self.sequence_len_offset = start
        rotary = None if layout.rotary is None else (layout.rotary, layout.rotary)
        try:
            yield layout.attention_mask(start, start + new_tokens), rotary
        finally:
            self.sequence_len_offset = outer
            layout.length = start + new_tokens

    def nbytes(self) -> int:
        """Bytes of all cached keys and values (the buffers as allocated)."""
        return sum(k.nbytes + v.nbytes for k, v in self.key_value_memory_dict.values())
