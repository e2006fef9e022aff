"""Core attention on torch's `scaled_dot_product_attention`, for the layers built without
transformer-engine (CPU, or a GPU without TE).

megatron-core's local `DotProductAttention` (transformer/dot_product_attention.py) computes
the full score matrix with `baddbmm` into a shared buffer, builds a causal mask per call and
fills it in place, then runs softmax and `bmm`: on the CPU `--quick` benchmark shape about
40% of the dense training step, much of it copies of [b, heads, s, s] tensors in backward.
SDPA's fused kernels (the flash kernel on CPU; flash, memory-efficient or cuDNN on GPU)
never materialise the scores (nor keep them for backward) and skip the masked-out half of
a causal matrix: the attention of the step costs about half as much.

`SDPADotProductAttention` is a drop-in for the local module: the same constructor and
forward signature, [s, b, heads, d] in and [s, b, heads x d] out, and the same meaning of
its masks, which other megamod code relies on:
- `attention_mask` None: causal when the mask type is causal (sq == sk; a single query
  row, sq == 1, attends to every key, as upstream's KV-cache decode step expects), no mask
  otherwise. The forward's `attn_mask_type` wins over the constructor's when given (as
  transformer-engine's does; upstream's local module ignores it).
- An explicit boolean mask broadcastable to [b, 1 | heads, sq, sk], True = masked out,
  used whatever the mask type, sq != sk allowed. Upstream writes -10000.0 into masked
  scores, so a row masked everywhere gets uniform weights over all keys, not NaN: here such
  a row's query is zeroed and its mask lifted, which gives those uniform weights exactly
  (and, like upstream, no gradient to that query or through it to the keys).
- `packed_seq_params` (packed rows, `megamod.micro_batch.packed_seq_params`: `sbhd`, host
  cu_seqlens over the rows laid end to end): causal attention within each sequence, one
  kernel call per sequence, without a mask. Against one [b, 1, s, s] per-sample mask
  (`benchmarks/packed_attention.py`, forward + backward, 2 rows x 8 heads (4 groups) x 64,
  2 cores, 2026-12-07): 640 positions with one 620-token sample a row 41 ms vs 49 ms (plain
  causal over the row: 34 ms), four text-only samples a row 20 vs 44 ms, 2048 positions
  with three samples a row 132 vs 485 ms: the causal kernel skips the masked half and every
  other sample's keys, a mask skips nothing. On a GPU the calls run flash kernels, which
  take no mask at all.
Departures: the softmax runs in fp32 for fp16/bf16 inputs even when the config's
`attention_softmax_in_fp32` is False (SDPA's fused kernels accumulate in fp32, and its math
fallback upcasts unless `torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)`
was called): only more precise; `apply_query_key_layer_scaling` divides and re-multiplies the scores by the layer
number upstream to keep fp16 scores in range, which cancels out: the kernels need no such
guard, so the scale is applied once. Sliding-window attention and softmax offsets
(`window_size`, `softmax_type` other than vanilla) are not implemented and refused.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide


class SDPADotProductAttention(MegatronModule):
    """megatron-core's local `DotProductAttention`, computed by `F.scaled_dot_product_attention`.
    `attention_type` and `cp_comm_type` are taken for the builder's signature; like upstream's
    local module, this one needs neither."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs transformer-engine's attention")
        if config.softmax_type != "vanilla":
            raise ValueError(f"softmax_type={config.softmax_type!r} is not implemented here")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ValueError("sliding-window attention is not implemented here")
        self.attn_mask_type = attn_mask_type

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        world_size = self.tp_group.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, world_size)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, world_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, world_size)
        head_dim = divide(projection_size, config.num_attention_heads)
        # Upstream's effective scale: its layer scaling divides and multiplies by the same
        # coefficient.
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        """query [sq, b, np, hn], key and value [sk, b, ng, hn] -> context [sq, b, np x hn]."""
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by the local attention")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b = query.shape[:2]
        sk = key.shape[0]
        # SDPA's layout: [b, heads, s, d] (views; the kernels take strided inputs).
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        allowed, is_causal = None, False
        if packed_seq_params is not None:
            if attention_mask is not None:
                raise ValueError("packed sequences take no attention_mask: cu_seqlens say it")
        elif attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise TypeError(
                    f"attention_mask must be boolean (True = masked), not {attention_mask.dtype}"
                )
            fully_masked = attention_mask.all(dim=-1, keepdim=True)
            allowed = ~attention_mask | fully_masked  # SDPA's convention: True = attend
            q = q.masked_fill(fully_masked, 0.0)  # equal scores: uniform weights
        elif mask_type == AttnMaskType.causal and sq > 1:
            if sq != sk:
                raise ValueError(f"causal without attention_mask needs sq == sk, got {sq} != {sk}")
            is_causal = True
        dropout_p = self.dropout_p if self.training else 0.0
        # Dropout draws from the model-parallel RNG stream, as upstream's does (outside
        # sequence parallelism); without dropout nothing is drawn and the fork is skipped.
        fork = dropout_p > 0.0 and not self.config.sequence_parallel
        attend = functools.partial(
            F.scaled_dot_product_attention, dropout_p=dropout_p, scale=self.softmax_scale,
            enable_gqa=self.num_query_groups_per_partition < self.num_attention_heads_per_partition,
        )
        with tensor_parallel.get_cuda_rng_tracker().fork() if fork else contextlib.nullcontext():
            if packed_seq_params is not None:
                context = _attend_packed(attend, q, k, v, packed_seq_params)
            else:
                context = attend(q, k, v, attn_mask=allowed, is_causal=is_causal)
        # [b, np, sq, hn] -> [sq, b, np x hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


def _attend_packed(
    attend: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    params: PackedSeqParams,
) -> torch.Tensor:
    """Causal attention within each sequence of packed rows: q [b, np, s, hn], k and v
    [b, ng, s, hn] (sq == sk), `params.cu_seqlens_q` over the rows laid end to end (host,
    `megamod.micro_batch.packed_seq_params`) -> [b, np, s, hn]. One causal kernel call per
    sequence on views of the rows; a sequence never crosses a row."""
    b, _, s, _ = q.shape
    if params.qkv_format != "sbhd":
        raise ValueError(f"packed sequences in qkv_format {params.qkv_format!r}: only 'sbhd' here")
    if k.shape[2] != s or not torch.equal(params.cu_seqlens_q, params.cu_seqlens_kv):
        raise ValueError("packed sequences here are self-attention: the same cu_seqlens for q and kv")
    bounds = params.cu_seqlens_q.tolist()
    if bounds[0] != 0 or bounds[-1] != b * s:
        raise ValueError(f"cu_seqlens {bounds} do not cover {b} rows of {s} positions")
    rows: list[list[torch.Tensor]] = [[] for _ in range(b)]
    for start, end in zip(bounds, bounds[1:]):
        row, first = divmod(start, s)
        last = end - row * s
        if not first < last <= s:
            raise ValueError(f"packed sequence [{start}, {end}) is empty or crosses rows of {s}")
        part = slice(first, last)
        rows[row].append(attend(q[row : row + 1, :, part], k[row : row + 1, :, part],
                                v[row : row + 1, :, part], is_causal=True))
    return torch.cat([torch.cat(parts, dim=2) for parts in rows])
