"""Model FLOPs and KV-cache bytes, analytically: one implementation for the training log
(`train/tflops_per_step`), `megamod inspect CONFIG --flops` and the benchmarks.

Counted: every matrix multiplication of a forward pass, 2 FLOPs per multiply-add
(attention scores and values over the full square of the tokens a layer sees, causal or
not, as torch's FLOP counter counts them; causal flash kernels skip
about half of that square): the ViT on its patches + CLS (the
built layers only), the projector, each decoder layer at the number of tokens it runs
(p-MoD: a MoD layer's kept tokens, its router on all of them; MoE: the router and top-k
experts per token) and the output layer. Training counts 3x the forward (backward: 2x).
Norms, activations, softmax and embedding lookups are left out (a few per mille).

KV cache: per decoder layer, keys and values of the prompt tokens it keeps (MoD layers
cache only their kept vision tokens, p-MoD section 3.4), `num_query_groups x head_dim`
values each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megamod.config import Config
from megamod.mod.schedule import layer_ratios


@dataclass(frozen=True)
class Sample:
    """What a sample's cost depends on: its images and its sequence length (padded
    positions run the layers too)."""

    images: int
    seq_length: int


def kept_tokens(config: Config, sample: Sample) -> list[int]:
    """Tokens each decoder layer runs: all, or in MoD layers text + trunc(n_v x ratio)."""
    vision = sample.images * config.model.vision.num_patches
    ratios = layer_ratios(config.mod, config.model.language.num_layers)
    # trunc(n x ratio) in float32, as the MoD layer computes it
    return [
        sample.seq_length if r is None
        else sample.seq_length - vision + int(np.trunc(np.float32(vision) * np.float32(r)))
        for r in ratios
    ]


def _attention_block(tokens: int, hidden: int, heads: int, groups: int) -> float:
    head_dim = hidden // heads
    qkv = 2 * tokens * hidden * (hidden + 2 * groups * head_dim)
    scores_and_values = 2 * 2 * tokens * tokens * hidden
    return qkv + scores_and_values + 2 * tokens * hidden * hidden


def vision_flops(config: Config) -> float:
    """Forward FLOPs of one image through the ViT (built layers) and the projector."""
    vision, language = config.model.vision, config.model.language
    patches, h = vision.num_patches, vision.hidden_size
    tokens = patches + 1  # CLS
    conv = 2 * patches * 3 * vision.patch_size**2 * h
    layer = _attention_block(tokens, h, vision.num_attention_heads, vision.num_attention_heads)
    layer += 2 * 2 * tokens * h * vision.ffn_hidden_size
    projector = 2 * patches * (h * language.hidden_size + language.hidden_size**2)
    return conv + vision.num_built_layers * layer + projector


def decoder_flops(config: Config, sample: Sample, vocab_size: int) -> float:
    """Forward FLOPs of one sample's sequence through the decoder and the output layer."""
    language, moe = config.model.language, config.moe
    h = language.hidden_size
    groups = language.num_query_groups or language.num_attention_heads
    mlp_matrices = 3 if language.swiglu else 2
    moe_layers = moe.layer_pattern(language.num_layers)
    ratios = layer_ratios(config.mod, language.num_layers)
    total = 0.0
    for layer, tokens in enumerate(kept_tokens(config, sample)):
        total += _attention_block(tokens, h, language.num_attention_heads, groups)
        if moe_layers[layer]:
            ffn = moe.ffn_hidden_size or language.ffn_hidden_size
            total += 2 * tokens * h * moe.num_experts  # router
            total += moe.router_topk * 2 * mlp_matrices * tokens * h * ffn
        else:
            total += 2 * mlp_matrices * tokens * h * language.ffn_hidden_size
        if ratios[layer] is not None:
            total += 2 * sample.seq_length * h  # the MoD router scores every token
    return total + 2 * sample.seq_length * h * vocab_size


def sample_flops(config: Config, sample: Sample, vocab_size: int, training: bool = True) -> float:
    forward = sample.images * vision_flops(config) + decoder_flops(config, sample, vocab_size)
    return 3 * forward if training else forward


def kv_cache_bytes(config: Config, sample: Sample, bytes_per_value: int = 2) -> int:
    """Bytes of keys and values one prompt leaves in the cache (bf16 by default)."""
    language = config.model.language
    head_dim = language.hidden_size // language.num_attention_heads
    groups = language.num_query_groups or language.num_attention_heads
    per_token = 2 * groups * head_dim * bytes_per_value
    return sum(per_token * tokens for tokens in kept_tokens(config, sample))


class StepFlops:
    """Training FLOPs of a step's micro-batches, counted from their tokens on the host (no
    device sync): a row is a sample as long as the row (its padding computed too), with its
    `<image>` placeholders / patches as images. A packed row counts as one sample: its
    attention is counted over the whole row, as Megatron-LM counts packed sequences."""

    def __init__(self, config: Config, vocab_size: int, image_token_id: int) -> None:
        self.config, self.vocab_size, self.image_token_id = config, vocab_size, image_token_id
        self._per_row: dict[tuple[int, int], float] = {}  # by (images, row length)

    def __call__(self, micro_batches: list[dict]) -> float:
        total = 0.0
        for batch in micro_batches:
            width = batch["tokens"].shape[1]
            placeholders = (batch["tokens"] == self.image_token_id).sum(1)
            for images in (placeholders // self.config.model.vision.num_patches).tolist():
                if (images, width) not in self._per_row:
                    row = Sample(images, width)
                    self._per_row[images, width] = sample_flops(self.config, row, self.vocab_size)
                total += self._per_row[images, width]
        return total
