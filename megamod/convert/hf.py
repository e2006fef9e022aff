"""Hugging Face LLaVA <-> megamod state-dict adapters: pure functions, no files, no processes.

`from_hf(state_dict, hf_config)` takes the tensors and the config (as `config.to_dict()`
gives it) of a transformers `LlavaForConditionalGeneration` and returns a megamod LLaVA's
state dict and the megamod config (a raw dict for `build_dataclass(Config, ...)`);
`to_hf(state_dict, config, image_token_id)` goes back. `from_hf_parts` builds the same from
a `CLIPVisionModel` and a Llama-family causal LM, without a projector. megamod's names are
those of `LLaVA.state_dict()` built at TP=1 with megatron-core's local (non-TE) layer specs;
dist_checkpointing reshards them to any TP/EP. A model built with transformer-engine's
specs names some tensors otherwise (`local_names`): its layer norms live in the linear
after them, and grouped-GEMM experts are one module. `to_hf` takes either; `module_names`
gives `from_hf`'s tensors the names of the model they are loaded into.

HF layouts read: transformers 4.x / the hub's `llava-hf/llava-1.5-7b-hf`
(`vision_tower.vision_model.*`, `language_model.model.*`, `language_model.lm_head.*`,
`multi_modal_projector.*`), what transformers 5 writes (`vision_tower.*` without
`vision_model.`) and the in-memory names of both (`model.` in front). `to_hf` writes the
hub layout, which both transformers 4 and 5 load. The text model is `llama` or `mistral`
(without a sliding window): no biases, SiLU-gated MLP, RMSNorm, default RoPE.

Where the mapping departs from a plain rename:
- megatron-core fuses q/k/v into `linear_qkv`, rows grouped per query group as
  [q heads of the group; k; v] (GQA: several q heads per group; the ViT: one). HF's RoPE
  rotates the two halves of each head (`rotate_half`), as megatron-core's
  `rotary_interleaved=False` does, so q/k rows need no permutation within a head.
- SwiGLU's `linear_fc1` is [gate; up] (megatron-core's `glu` applies the activation to
  the first half).
- The ViT: megatron-core's CLIPViTModel builds only the layers up to the feature layer
  (`model.vision.num_built_layers`), has no post-layernorm and keeps the class token as
  [1, 1, h]. Import drops HF's later layers and `post_layernorm`; export writes the built
  layers only, with `num_hidden_layers` = their count and `vision_feature_layer` = -1
  (the same features), and an identity `post_layernorm` (LLaVA never uses it).
- HF's `vision_feature_layer` counted from the front (k > 0, after k layers) becomes
  megamod's negative `feature_layer`.
- Tied embeddings: no `lm_head` tensor on either side.
- The vocabulary (embedding and output rows) is the checkpoint's; `pad_vocab` appends
  zero rows so it splits evenly over TP ranks, and export writes every row.

MoE checkpoints (`moe.num_experts` set) export in a Mixtral/Qwen2-MoE-like layout that
transformers' LLaVA cannot run (its Llama has no experts) but `from_hf` reads back
losslessly. On the MoE layers only, the dense MLP tensors are replaced by
  `language_model.model.layers.{i}.mlp.gate.weight`                     router [E, h]
  `language_model.model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`
and `text_config` gains `num_local_experts` (E), `num_experts_per_tok` (top-k),
`moe_layers` (indices of the MoE layers), `moe_intermediate_size` (experts' width) and
`router_aux_loss_coef` (`moe.aux_loss_coeff`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping
from typing import Any

import torch

from megamod.config import Config, build_dataclass
from megamod.errors import CheckpointError

StateDict = dict[str, torch.Tensor]

_V = "vision_tower.vision_model."
_P = "multi_modal_projector."
_T = "language_model.model."
_HEAD = "language_model.lm_head.weight"
_CLASS_TOKEN = ("vision_model.class_token", _V + "embeddings.class_embedding")
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Every layout transformers has written or holds in memory -> the hub layout (`to_hf`'s).
_LLAVA_PREFIXES = tuple((re.compile(p), canonical) for p, canonical in (
    (r"^(model\.)?vision_tower\.(vision_model\.)?", _V),
    (r"^(model\.)?multi_modal_projector\.", _P),
    (r"^(language_model\.model\.|model\.language_model\.)", _T),
    (r"^(language_model\.)?lm_head\.", "language_model.lm_head."),
))
# HF tensors megamod has no place for: CLIP's post-layernorm (unused by LLaVA), buffers.
_UNUSED = re.compile(rf"^{re.escape(_V)}post_layernorm\.|position_ids$|rotary_emb\.inv_freq$")
# A full CLIPModel's (openai/clip-vit-large-patch14-336) tensors besides its vision tower.
_CLIP_NON_VISION = re.compile(r"^(text_model\.|logit_scale$|visual_projection\.|text_projection\.)")


@dataclasses.dataclass(frozen=True)
class _Fused:
    """One megamod tensor made of several HF tensors along dim 0: each HF tensor is cut
    into `groups` equal chunks and the chunks alternate, group by group ([q_0; k_0; v_0;
    q_1; ...]); `shares` are the HF tensors' relative sizes. groups=1: concatenation."""

    hf_keys: tuple[str, ...]
    groups: int = 1
    shares: tuple[int, ...] = (1, 1)

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        rest = parts[0].shape[1:]
        grouped = [p.reshape(self.groups, -1, *rest) for p in parts]
        return torch.cat(grouped, dim=1).reshape(-1, *rest)

    def split(self, fused: torch.Tensor) -> list[torch.Tensor]:
        rest = fused.shape[1:]
        unit = fused.shape[0] // (self.groups * sum(self.shares))
        chunks = fused.reshape(self.groups, -1, *rest).split([s * unit for s in self.shares], 1)
        # Copies: views of one storage cannot be saved as separate safetensors.
        return [c.reshape(-1, *rest).clone() for c in chunks]


def _unsupported(key: str, value: Any, fix: str) -> CheckpointError:
    return CheckpointError(f"{key}={value!r} cannot be represented in megamod: {fix}")


# ------------------------------------------------------------------------------ configs


def _text_config(text: Mapping[str, Any]) -> dict[str, Any]:
    """megamod's `model.language` from a Llama-family `text_config`; refuses the rest."""
    kind = text.get("model_type")
    if kind not in ("llama", "mistral"):
        raise _unsupported("text_config.model_type", kind,
                           "only Llama-family decoders (llama, mistral) convert")
    for key in ("attention_bias", "mlp_bias"):
        if text.get(key):
            raise _unsupported(f"text_config.{key}", True, "megamod's decoder has no biases")
    if text.get("hidden_act", "silu") != "silu":
        raise _unsupported("text_config.hidden_act", text["hidden_act"],
                           "megamod uses SwiGLU (silu)")
    if text.get("sliding_window") is not None:
        raise _unsupported("text_config.sliding_window", text["sliding_window"],
                           "megamod attends to the whole sequence")
    rope = text.get("rope_parameters") or {}
    if text.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise _unsupported("text_config.rope_parameters", rope or text["rope_scaling"],
                           "only unscaled RoPE (rope_type 'default') converts")
    theta = rope.get("rope_theta", text.get("rope_theta", 10000.0))
    if theta != int(theta):
        raise _unsupported("text_config.rope_theta", theta, "model.language.rotary_base is an int")
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    if text.get("head_dim") not in (None, hidden // heads):
        raise _unsupported("text_config.head_dim", text["head_dim"], f"megamod's head size is "
                           f"hidden_size / num_attention_heads = {hidden // heads}")
    return {
        "num_layers": text["num_hidden_layers"],
        "hidden_size": hidden,
        "ffn_hidden_size": text["intermediate_size"],
        "num_attention_heads": heads,
        "num_query_groups": text.get("num_key_value_heads") or heads,
        "seq_length": text["max_position_embeddings"],
        "normalization": "RMSNorm",
        "swiglu": True,
        "rotary_base": int(theta),
        "layernorm_epsilon": text["rms_norm_eps"],
        "untie_embeddings_and_output_weights": not text.get("tie_word_embeddings", False),
    }


def _moe_config(text: Mapping[str, Any]) -> dict[str, Any]:
    """megamod's `moe` section from the MoE fields `to_hf` adds; empty for a dense model."""
    if "num_local_experts" not in text:
        return {}
    moe_layers = set(text["moe_layers"])
    width = text["moe_intermediate_size"]
    return {
        "num_experts": text["num_local_experts"],
        "router_topk": text["num_experts_per_tok"],
        "layer_freq": [int(i in moe_layers) for i in range(text["num_hidden_layers"])],
        "ffn_hidden_size": None if width == text["intermediate_size"] else width,
        "aux_loss_coeff": text["router_aux_loss_coef"],
    }


def _vision_config(vision: Mapping[str, Any], feature_layer: Any) -> dict[str, Any]:
    """megamod's `model.vision` from a `CLIPVisionConfig` and LLaVA's vision_feature_layer."""
    if vision.get("model_type") != "clip_vision_model":
        raise _unsupported("vision_config.model_type", vision.get("model_type"),
                           "only CLIP vision towers (clip_vision_model) convert")
    if vision.get("hidden_act") not in ("quick_gelu", "gelu"):
        raise _unsupported("vision_config.hidden_act", vision.get("hidden_act"),
                           "model.vision.activation is quick_gelu or gelu")
    if vision.get("num_channels", 3) != 3:
        raise _unsupported("vision_config.num_channels", vision["num_channels"], "RGB only")
    num_layers = vision["num_hidden_layers"]
    if not isinstance(feature_layer, int) or feature_layer == 0 or abs(feature_layer) > num_layers:
        raise _unsupported("vision_feature_layer", feature_layer,
                           f"give one layer, -{num_layers}..-1 (or 1..{num_layers})")
    return {
        "image_size": vision["image_size"],
        "patch_size": vision["patch_size"],
        "num_layers": num_layers,
        "hidden_size": vision["hidden_size"],
        "ffn_hidden_size": vision["intermediate_size"],
        "num_attention_heads": vision["num_attention_heads"],
        # hidden_states[k] (k > 0) is the output of layer k: -1 is the last layer's.
        "feature_layer": feature_layer if feature_layer < 0 else feature_layer - num_layers - 1,
        "activation": vision["hidden_act"],
        "layernorm_epsilon": vision["layer_norm_eps"],
    }


def _check_llava(hf_config: Mapping[str, Any]) -> None:
    checks = (
        ("model_type", "llava", "only LlavaForConditionalGeneration (model_type llava) converts"),
        ("vision_feature_select_strategy", "default",
         "megamod drops the CLS token (strategy 'default')"),
        ("projector_hidden_act", "gelu", "megamod's projector is mlp2x_gelu"),
        ("multimodal_projector_bias", True, "megamod's projector has biases"),
    )
    for key, expected, fix in checks:
        if hf_config.get(key, expected) != expected:
            raise _unsupported(key, hf_config[key], fix)


def _megamod_config(hf_config: Mapping[str, Any], embedding: torch.Tensor) -> dict[str, Any]:
    """The megamod config (raw dict) of a LLaVA config; the vocabulary size and dtype are
    the embedding's."""
    if embedding.dtype not in _DTYPES:
        raise _unsupported("dtype", str(embedding.dtype),
                           "give float32, bfloat16 or float16 weights")
    text = hf_config["text_config"]
    language = {**_text_config(text), "vocab_size": embedding.shape[0]}
    if hf_config.get("tie_word_embeddings"):
        language["untie_embeddings_and_output_weights"] = False
    return {
        "model": {
            "vision": _vision_config(
                hf_config["vision_config"], hf_config.get("vision_feature_layer", -2)
            ),
            "projector": {"projector_type": "mlp2x_gelu"},
            "language": language,
            "init_method_std": text.get("initializer_range", 0.02),
        },
        "moe": _moe_config(text),
        "precision": {"params_dtype": _DTYPES[embedding.dtype]},
    }


def hf_config(
    config: Config, image_token_id: int, vocab_size: int, dtype: torch.dtype
) -> dict[str, Any]:
    """The `LlavaForConditionalGeneration` config (as config.json holds it) of `config`, with
    the (padded) vocabulary size and the dtype of its weights."""
    vision, language, moe = config.model.vision, config.model.language, config.moe
    tied = not language.untie_embeddings_and_output_weights
    text = {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": language.hidden_size,
        "intermediate_size": language.ffn_hidden_size,
        "num_hidden_layers": language.num_layers,
        "num_attention_heads": language.num_attention_heads,
        "num_key_value_heads": language.num_query_groups or language.num_attention_heads,
        "head_dim": language.hidden_size // language.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": language.seq_length,
        "rms_norm_eps": language.layernorm_epsilon,
        "rope_theta": float(language.rotary_base),
        "initializer_range": config.model.init_method_std,
        "tie_word_embeddings": tied,
    }
    if moe.num_experts is not None:
        pattern = moe.layer_pattern(language.num_layers)
        text.update(
            num_local_experts=moe.num_experts,
            num_experts_per_tok=moe.router_topk,
            moe_layers=[i for i, is_moe in enumerate(pattern) if is_moe],
            moe_intermediate_size=moe.ffn_hidden_size or language.ffn_hidden_size,
            router_aux_loss_coef=moe.aux_loss_coeff,
        )
    return {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "dtype": str(dtype).removeprefix("torch."),
        "image_token_index": image_token_id,
        "image_seq_length": vision.num_patches,
        "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": "default",
        # Only the layers up to the feature layer exist: the last of them is the feature.
        "vision_feature_layer": -1,
        "multimodal_projector_bias": True,
        "tie_word_embeddings": tied,
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": vision.hidden_size,
            "intermediate_size": vision.ffn_hidden_size,
            "num_hidden_layers": vision.num_built_layers,
            "num_attention_heads": vision.num_attention_heads,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "hidden_act": vision.activation,
            "layer_norm_eps": vision.layernorm_epsilon,
        },
        "text_config": text,
    }


# ------------------------------------------------------------------------------ tensors


def _mapping(config: Config, projector: bool = True) -> dict[str, str | _Fused]:
    """megamod key -> HF key(s) (hub layout), for every tensor but the class token."""
    vision, language = config.model.vision, config.model.language
    m: dict[str, str | _Fused] = {
        "vision_model.conv1.weight": _V + "embeddings.patch_embedding.weight",
        "vision_model.position_embeddings.weight": _V + "embeddings.position_embedding.weight",
        "vision_model.ln_pre.weight": _V + "pre_layrnorm.weight",
        "vision_model.ln_pre.bias": _V + "pre_layrnorm.bias",
    }
    for i in range(vision.num_built_layers):
        ours, theirs = f"vision_model.decoder.layers.{i}.", f"{_V}encoder.layers.{i}."
        for p in ("weight", "bias"):
            m.update({
                f"{ours}input_layernorm.{p}": f"{theirs}layer_norm1.{p}",
                f"{ours}self_attention.linear_qkv.{p}": _Fused(
                    tuple(f"{theirs}self_attn.{x}_proj.{p}" for x in "qkv"),
                    groups=vision.num_attention_heads, shares=(1, 1, 1),
                ),
                f"{ours}self_attention.linear_proj.{p}": f"{theirs}self_attn.out_proj.{p}",
                f"{ours}pre_mlp_layernorm.{p}": f"{theirs}layer_norm2.{p}",
                f"{ours}mlp.linear_fc1.{p}": f"{theirs}mlp.fc1.{p}",
                f"{ours}mlp.linear_fc2.{p}": f"{theirs}mlp.fc2.{p}",
            })
    if projector:
        for j in (1, 2):
            for p in ("weight", "bias"):
                m[f"vision_projection.encoder.linear_fc{j}.{p}"] = f"{_P}linear_{j}.{p}"
    m["language_model.embedding.word_embeddings.weight"] = _T + "embed_tokens.weight"
    groups = language.num_query_groups or language.num_attention_heads
    for i, is_moe in enumerate(config.moe.layer_pattern(language.num_layers)):
        ours, theirs = f"language_model.decoder.layers.{i}.", f"{_T}layers.{i}."
        m.update({
            f"{ours}input_layernorm.weight": f"{theirs}input_layernorm.weight",
            f"{ours}self_attention.linear_qkv.weight": _Fused(
                tuple(f"{theirs}self_attn.{x}_proj.weight" for x in "qkv"),
                groups=groups, shares=(language.num_attention_heads // groups, 1, 1),
            ),
            f"{ours}self_attention.linear_proj.weight": f"{theirs}self_attn.o_proj.weight",
            f"{ours}pre_mlp_layernorm.weight": f"{theirs}post_attention_layernorm.weight",
        })
        experts = [(f"{ours}mlp.", f"{theirs}mlp.")]
        if is_moe:
            m[f"{ours}mlp.router.weight"] = f"{theirs}mlp.gate.weight"
            experts = [(f"{ours}mlp.experts.local_experts.{e}.", f"{theirs}mlp.experts.{e}.")
                       for e in range(config.moe.num_experts)]
        for mlp, hf_mlp in experts:
            m[f"{mlp}linear_fc1.weight"] = _Fused(
                (f"{hf_mlp}gate_proj.weight", f"{hf_mlp}up_proj.weight")
            )
            m[f"{mlp}linear_fc2.weight"] = f"{hf_mlp}down_proj.weight"
    m["language_model.decoder.final_layernorm.weight"] = _T + "norm.weight"
    if language.untie_embeddings_and_output_weights:
        m["language_model.output_layer.weight"] = _HEAD
    return m


# transformer-engine's state_dict() names -> the local spec's, for the tensors they differ
# in: TELayerNormColumnParallelLinear holds the norm before it (the names megatron-core's
# local GPT spec and megamod's local ViT spec map to in `sharded_state_dict_keys_map`), and
# TEGroupedMLP holds every expert's weight as `weight{e}` of one linear.
_LOCAL_NAMES = tuple((re.compile(pattern), local) for pattern, local in (
    (r"\.self_attention\.linear_qkv\.layer_norm_(weight|bias)$", r".input_layernorm.\1"),
    (r"\.mlp\.linear_fc1\.layer_norm_(weight|bias)$", r".pre_mlp_layernorm.\1"),
    (r"\.mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$",
     r".mlp.experts.local_experts.\3.\1.\2"),
))
# The reverse: a local name -> transformer-engine's.
_TE_NAMES = tuple((re.compile(pattern), te) for pattern, te in (
    (r"\.input_layernorm\.(weight|bias)$", r".self_attention.linear_qkv.layer_norm_\1"),
    (r"\.pre_mlp_layernorm\.(weight|bias)$", r".mlp.linear_fc1.layer_norm_\1"),
    (r"\.mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.(weight|bias)$",
     r".mlp.experts.\2.\3\1"),
))


def _renamed(key: str, renames: tuple) -> str:
    for pattern, replacement in renames:
        name, found = pattern.subn(replacement, key)
        if found:
            return name
    return key


def local_names(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A LLaVA's tensors under the local spec's names, whichever specs built it (the local
    ones: unchanged). transformer-engine's `_extra_state` entries are left as they are."""
    return {_renamed(key, _LOCAL_NAMES): tensor for key, tensor in state_dict.items()}


def module_names(
    state_dict: Mapping[str, torch.Tensor], module_keys: Collection[str]
) -> StateDict:
    """`state_dict` (the local spec's names, as `from_hf` gives them) under the names of the
    model whose `state_dict()` keys are `module_keys`: built with the local specs, the
    same; with transformer-engine's, the fused norms and grouped experts renamed (a MoE
    layer keeps its own pre-MLP norm). Names the model has neither way are kept, for its
    strict `load_state_dict` to report."""
    out = {}
    for key, tensor in state_dict.items():
        te_key = _renamed(key, _TE_NAMES)
        out[te_key if key not in module_keys and te_key in module_keys else key] = tensor
    return out


def _canonical(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A LLaVA checkpoint's tensors under the hub layout's names."""
    out = {}
    for key, tensor in state_dict.items():
        for pattern, prefix in _LLAVA_PREFIXES:
            name, found = pattern.subn(prefix, key)
            if found:
                out[name] = tensor
                break
        else:
            raise CheckpointError(
                f"tensor {key} belongs to no part of a LLaVA model (vision_tower, "
                f"multi_modal_projector, language_model): not a LlavaForConditionalGeneration "
                f"checkpoint"
            )
    return out


def _take(hf: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in hf:
        raise CheckpointError(f"tensor {key} is missing, though the config describes it")
    return hf[key]


def _ours(hf: Mapping[str, torch.Tensor], config: Config, projector: bool) -> StateDict:
    """megamod's tensors from HF's (hub-layout names); refuses HF tensors it cannot place."""
    out = {_CLASS_TOKEN[0]: _take(hf, _CLASS_TOKEN[1]).reshape(1, 1, -1)}
    used = {_CLASS_TOKEN[1]}
    for ours, theirs in _mapping(config, projector).items():
        keys = theirs.hf_keys if isinstance(theirs, _Fused) else (theirs,)
        parts = [_take(hf, key) for key in keys]
        out[ours] = theirs.join(parts) if isinstance(theirs, _Fused) else parts[0]
        used.update(keys)
    built = config.model.vision.num_built_layers
    dropped = re.compile(rf"^{re.escape(_V)}encoder\.layers\.(\d+)\.")

    def unused(key: str) -> bool:  # by design: later ViT layers, a tied head's copy, buffers
        layer = dropped.match(key)
        return (bool(_UNUSED.search(key)) or (layer is not None and int(layer[1]) >= built)
                or key == _HEAD and not config.model.language.untie_embeddings_and_output_weights)

    left = sorted(key for key in hf.keys() - used if not unused(key))
    if left:
        raise CheckpointError(
            f"{len(left)} tensors have no place in megamod's model, e.g. {left[:3]}: the "
            f"checkpoint holds parts its config does not describe (an architecture or "
            f"option megamod cannot represent)"
        )
    return out


def from_hf(
    state_dict: Mapping[str, torch.Tensor], hf_config: Mapping[str, Any]
) -> tuple[StateDict, dict[str, Any]]:
    """A `LlavaForConditionalGeneration` (its tensors and `config.to_dict()`) as a megamod
    LLaVA's state dict (names of a TP=1 model) and config (raw dict). Raises
    CheckpointError, naming the config key, for what megamod cannot represent."""
    _check_llava(hf_config)
    hf = _canonical(state_dict)
    raw = _megamod_config(hf_config, _take(hf, _T + "embed_tokens.weight"))
    return _ours(hf, build_dataclass(Config, raw, prefix=""), projector=True), raw


def from_hf_parts(
    vision_state_dict: Mapping[str, torch.Tensor],
    vision_config: Mapping[str, Any],
    text_state_dict: Mapping[str, torch.Tensor],
    text_config: Mapping[str, Any],
) -> tuple[StateDict, dict[str, Any]]:
    """A megamod LLaVA from a CLIP vision tower (a `CLIPVisionModel`, or a whole `CLIPModel`
    whose text half is ignored) and a Llama-family causal LM, as `from_hf` returns it but
    without projector tensors (they start fresh). LLaVA-1.5's feature layer (-2)."""
    if vision_config.get("model_type") == "clip":
        vision_config = vision_config["vision_config"]
    hf = {_V + key.removeprefix("vision_model."): tensor
          for key, tensor in vision_state_dict.items() if not _CLIP_NON_VISION.match(key)}
    # LlamaForCausalLM's `model.*` and `lm_head.*` sit under `language_model.` in LLaVA.
    hf.update({f"language_model.{key}": tensor for key, tensor in text_state_dict.items()})
    llava = {"vision_config": vision_config, "text_config": text_config, "vision_feature_layer": -2}
    raw = _megamod_config(llava, _take(hf, _T + "embed_tokens.weight"))
    return _ours(hf, build_dataclass(Config, raw, prefix=""), projector=False), raw


def to_hf(
    state_dict: Mapping[str, torch.Tensor], config: Config, image_token_id: int
) -> tuple[StateDict, dict[str, Any]]:
    """A megamod LLaVA (names of a TP=1 model, local or transformer-engine specs;
    `_extra_state` entries are ignored) as a `LlavaForConditionalGeneration`'s tensors (hub
    layout) and config.json dict. Raises CheckpointError for tensors HF's LLaVA has no
    place for (e.g. p-MoD's routers)."""
    state_dict = local_names(state_dict)
    mapping = _mapping(config)
    left = sorted(key for key in state_dict.keys() - mapping.keys() - {_CLASS_TOKEN[0]}
                  if not key.endswith("_extra_state"))
    if left:
        raise CheckpointError(
            f"{len(left)} tensors have no place in a Hugging Face LLaVA, e.g. {left[:3]}"
        )
    out = {_CLASS_TOKEN[1]: state_dict[_CLASS_TOKEN[0]].reshape(-1)}
    for ours, theirs in mapping.items():
        if isinstance(theirs, _Fused):
            out.update(zip(theirs.hf_keys, theirs.split(state_dict[ours])))
        else:
            out[theirs] = state_dict[ours]
    norm = out[_V + "pre_layrnorm.weight"]
    out[_V + "post_layernorm.weight"] = torch.ones_like(norm)
    out[_V + "post_layernorm.bias"] = torch.zeros_like(norm)
    # One dtype, the embedding's: megatron-core keeps norms and the ViT's conv1 in fp32
    # in a bf16/fp16 model.
    embedding = state_dict["language_model.embedding.word_embeddings.weight"]
    out = {key: tensor.to(embedding.dtype) for key, tensor in out.items()}
    return out, hf_config(config, image_token_id, embedding.shape[0], embedding.dtype)


def pad_vocab(state_dict: Mapping[str, torch.Tensor], rows: int) -> StateDict:
    """The state dict with zero rows appended to the embedding (and output layer) up to
    `rows`, as Megatron-LM pads its vocabulary (a zero output row gives logit 0)."""
    out = dict(state_dict)
    for key in ("language_model.embedding.word_embeddings.weight",
                "language_model.output_layer.weight"):
        if key in out:
            table = out[key]
            out[key] = torch.cat([table, table.new_zeros(rows - table.shape[0], table.shape[1])])
    return out
