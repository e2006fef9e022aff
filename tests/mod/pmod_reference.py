"""Transliterations of p-MoD's official code, for `tests/mod/test_official_pmod.py`.

Source: github.com/MCG-NJU/p-MoD at commit 459f6df674034dadc7194b40c258e20d90469651
(2025-06-26). Files (line numbers at that commit):

- `llava/model/language_model/pmod_llava_llama.py` (below: PMOD): `build_mod_layers`
  (69-118), `TokenRouter` (449-459), `ModLayer.__init__` (462-490), `ModLayer.forward`
  (492-630), `ModLayer.weight_normalization` (632-645), `shifted_cos_with_ratio` (655-656).
- `llava/model/language_model/modeling_llama_pmod.py` (LLAMA):
  `LlamaDecoderLayer.forward_return_residual` (825-883).
- `scripts/train/finetune_eval_7b_pmod_llava_1_5.sh` (SCRIPT) lines 11-18: the LLaVA-1.5
  recipe, `mod_target_layers=shiftedcos_decay_0.85_0.15`, `mod_target_token_type=vision_all`,
  `mod_router_factor=0.5`, `mod_weight_norm=tanh_0.2_1`, `mod_bias_enabled=True`,
  `mod_special_init=True`.

The official tensors are batch-first ([b, s, ...]); the functions here keep that layout and
the official statement order, so each line can be read against the original. Only what
needs a Hugging Face model is replaced by a callable the caller passes (the decoder
layer's `forward_return_residual`, the plain decoder layer).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

OFFICIAL_COMMIT = "459f6df674034dadc7194b40c258e20d90469651"

# SCRIPT lines 11-18.
RECIPE = dict(
    mod_target_layers="shiftedcos_decay_0.85_0.15",
    mod_target_token_type="vision_all",
    mod_router_factor=0.5,
    mod_weight_norm="tanh_0.2_1",
    mod_bias_enabled=True,
    mod_special_init=True,
)


# PMOD 655-664.
def shifted_cos_with_ratio(average_ratio: float, layer_idx: int) -> float:
    return math.cos(layer_idx * math.pi / 31) / 2 + average_ratio


def shifted_linear_with_ratio(average_ratio: float, layer_idx: int) -> float:
    return (- layer_idx / 31 + 0.5) + average_ratio


decay_func_dict = {
    "shiftedcos": shifted_cos_with_ratio,
    "shiftedlinear": shifted_linear_with_ratio,
}


def build_mod_layers(mod_target_layers: str, num_hidden_layers: int,
                     mod_router_factor: float) -> dict[int, float]:
    """PMOD 69-118 (`PmodLlavaLlamaModel.build_mod_layers`) with `ModLayer.__init__`'s ratio
    (PMOD 470-473): {MoD layer index: the ratio its ModLayer keeps}."""
    if (match := re.match(r"(\w+)_decay_(\d+\.\d+)_(\d+\.\d+)", mod_target_layers)):  # PMOD 73
        decay_type = match.group(1)
        max_ratio = float(match.group(2))
        min_ratio = float(match.group(3))
        decay_func = decay_func_dict[decay_type]
        mod_target_layer_indices = [  # PMOD 80-83
            i for i in range(num_hidden_layers)
            if decay_func(mod_router_factor, i) <= max_ratio
        ]
        # PMOD 87-95: ratio = max(decay_func(config.mod_router_factor, idx), min_ratio)
        return {idx: max(decay_func(mod_router_factor, idx), min_ratio)
                for idx in mod_target_layer_indices}
    if mod_target_layers == "deep_all":  # PMOD 99-108
        mod_target_layer_indices = list(range(2, num_hidden_layers - 1))
    elif mod_target_layers == "deep_all_include_last":
        mod_target_layer_indices = list(range(2, num_hidden_layers))
    elif mod_target_layers == "interleave":
        mod_target_layer_indices = list(range(1, num_hidden_layers, 2))
    else:
        raise NotImplementedError(f"Unsupported mod_target_layers: {mod_target_layers}")
    # PMOD 113-118 + 472-473: ratio None, so self.mod_router_factor = config.mod_router_factor
    return {idx: mod_router_factor for idx in mod_target_layer_indices}


def parse_weight_norm(mod_weight_norm: str) -> tuple[str, float, float]:
    """PMOD 478-490 (`ModLayer.__init__`)."""
    match = re.match(r"(\w+)_(\d+\.\d+|\d+)_(-?\d+\.\d+|-?\d+)", mod_weight_norm)  # {tanh}_0.2_1
    if match:
        norm_type, scale, bias = match.groups()
        scale = float(scale)
        bias = float(bias)
    else:
        norm_type = mod_weight_norm
        scale = 1.0
        bias = 1.0
    return norm_type, scale, bias


def weight_normalization(router_weights: torch.Tensor, norm_type: str, scale: float,
                         bias: float) -> torch.Tensor:
    """PMOD 632-645 (`ModLayer.weight_normalization`); router_weights [b, s]."""
    if norm_type == "softmax":
        router_weights = F.softmax(router_weights, dim=1)
    elif norm_type == "sigmoid":
        router_weights = F.sigmoid(router_weights)
    elif norm_type == "tanh":
        router_weights = F.tanh(router_weights)
    elif norm_type != "none":
        raise NotImplementedError(f"Unsupported norm_type for router: {norm_type}")
    return router_weights * scale + bias


class TokenRouter(nn.Module):
    """PMOD 449-459."""

    def __init__(self, hidden_size: int, mod_bias_enabled: bool, mod_special_init: bool):
        super().__init__()
        self.router = nn.Linear(hidden_size, 1, bias=mod_bias_enabled)
        if mod_special_init:
            nn.init.zeros_(self.router.weight)
            if mod_bias_enabled:
                nn.init.zeros_(self.router.bias)

    def forward(self, x):
        return self.router(x).squeeze(-1)  # [batch_size, seq_len]


def top_k_lengths(mod_target_mask: torch.Tensor, mod_router_factor: float) -> torch.Tensor:
    """PMOD 525 and 534: per sample trunc(n_target x ratio), n in int32, the product in
    float32 (int tensor x Python float)."""
    mod_target_lengths = mod_target_mask.sum(dim=1).int()  # PMOD 525
    return torch.trunc(mod_target_lengths * mod_router_factor).int()  # PMOD 534


def select(router_logits: torch.Tensor, mod_target_mask: torch.Tensor,
           attention_mask_2d: Optional[torch.Tensor], mod_router_factor: float,
           norm: tuple[str, float, float]):
    """PMOD 525-557 on router logits [b, s] (what `self.router(hidden_states)` gives,
    PMOD 527): (normalised weights [b, s], kept MoD-target mask, all-kept mask)."""
    router_logits = router_logits.clone()
    mod_target_lengths = mod_target_mask.sum(dim=1).int()  # PMOD 525
    # PMOD 530: mask tokens that are not target for MoD, so that they won't be selected by topk
    router_logits[~mod_target_mask] = float('-inf')
    router_logits = weight_normalization(router_logits, *norm)  # PMOD 532
    top_k_lengths = torch.trunc(mod_target_lengths * mod_router_factor).int()  # PMOD 534
    max_top_k_length = top_k_lengths.max().item()
    _, router_indices = torch.topk(router_logits, max_top_k_length, dim=1, sorted=True)  # PMOD 536
    top_k_mask = (torch.arange(max_top_k_length, device=router_logits.device).unsqueeze(0)
                  < top_k_lengths.unsqueeze(1))  # PMOD 538
    kept_mod_target_tokens_mask = torch.full_like(mod_target_mask, False, dtype=torch.bool)
    kept_mod_target_tokens_mask.scatter_(dim=1, index=router_indices, src=top_k_mask)  # PMOD 542-546
    kept_tokens_mask = kept_mod_target_tokens_mask.clone()  # PMOD 551
    if attention_mask_2d is not None:  # PMOD 554-557
        kept_tokens_mask[(~mod_target_mask) & attention_mask_2d] = True
    else:  # Inference
        kept_tokens_mask[~mod_target_mask] = True
    return router_logits, kept_mod_target_tokens_mask, kept_tokens_mask


# forward_return_residual(kept_tokens [b, K, h], kept_attention_mask_2d [b, K] or None,
# kept_position_ids [b, K]) -> (outputs[0] = MLP(post_attention_layernorm(r)), residual r =
# x + Attn(input_layernorm(x))), as LLAMA 854-883 computes them on the kept tokens.
ForwardReturnResidual = Callable[[torch.Tensor, Optional[torch.Tensor], torch.Tensor],
                                 tuple[torch.Tensor, torch.Tensor]]


def mod_layer_forward(
    hidden_states: torch.Tensor,
    attention_mask_2d: Optional[torch.Tensor],
    position_ids: torch.Tensor,
    mod_target_mask: Optional[torch.Tensor],
    router: Callable[[torch.Tensor], torch.Tensor],
    mod_router_factor: float,
    norm: tuple[str, float, float],
    forward_return_residual: ForwardReturnResidual,
    decoder_layer: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """PMOD 492-630 (`ModLayer.forward`), the layer's hidden states out [b, s, h].

    hidden_states [b, s, h]; attention_mask_2d [b, s] bool or None (PMOD 523: the model's
    2-d mask, None without padding, `PmodLlavaLlamaModel.forward` PMOD 176); position_ids
    [1, s] (PMOD 165-170: arange when not given); `decoder_layer` the plain layer (PMOD
    514-521) for a batch without MoD targets."""
    batch_size, seq_length = hidden_states.shape[:2]
    if (mod_target_mask is None) or torch.all(~mod_target_mask):  # PMOD 507
        return decoder_layer(hidden_states)  # PMOD 514-521
    attention_mask = attention_mask_2d  # PMOD 523
    router_logits, kept_mod_target_tokens_mask, kept_tokens_mask = select(  # PMOD 525-557
        router(hidden_states), mod_target_mask, attention_mask, mod_router_factor, norm)

    hidden_states = hidden_states.clone()  # PMOD 559
    kept_tokens_lengths = kept_tokens_mask.sum(dim=1).int()  # PMOD 562-572
    kept_tokens = torch.split(hidden_states[kept_tokens_mask], kept_tokens_lengths.tolist())
    kept_position_ids = torch.split(position_ids.repeat(batch_size, 1)[kept_tokens_mask],
                                    kept_tokens_lengths.tolist())
    kept_tokens = nn.utils.rnn.pad_sequence(kept_tokens, batch_first=True)
    kept_position_ids = nn.utils.rnn.pad_sequence(kept_position_ids, batch_first=True)
    kept_attention_mask = (torch.arange(kept_tokens_lengths.max(), device=hidden_states.device)
                           .unsqueeze(0) < kept_tokens_lengths.unsqueeze(1))  # PMOD 575
    kept_attention_mask_2d = (kept_attention_mask if (kept_attention_mask is not None
                              and 0 in kept_attention_mask) else None)  # PMOD 577
    # PMOD 580-593 turn the mask into flash-attention's 2-d mask (training) or a 4-d causal
    # one; forward_return_residual applies it (causal over the kept tokens, padding out).
    outputs0, residual = forward_return_residual(kept_tokens, kept_attention_mask_2d,
                                                 kept_position_ids)  # PMOD 601-608
    if kept_attention_mask_2d is not None:  # PMOD 612-617
        hidden_states[kept_tokens_mask] = outputs0[kept_attention_mask_2d]
    else:
        hidden_states[kept_tokens_mask] = outputs0.squeeze(0)
    hidden_states[mod_target_mask] *= router_logits[mod_target_mask].unsqueeze(-1)  # PMOD 619
    if kept_attention_mask_2d is not None:  # PMOD 622-625
        hidden_states[kept_tokens_mask] += residual[kept_attention_mask_2d]
    else:
        hidden_states[kept_tokens_mask] += residual.squeeze(0)
    return hidden_states  # PMOD 629-630
