"""Typed configuration: one dataclass per section, loaded from YAML plus overrides.

`load_config("run.yaml", ["train.lr=1e-4", "parallel.sequence_parallel=true"])` reads
the YAML (after the file its optional top-level `base:` names, relative to it, whose
sections it overrides key by key: a stage config states only what differs), applies the dotted overrides (values parsed as YAML scalars/lists), checks
every key and type against the dataclasses below and validates the combinations that
can be checked before any process starts. A mistake raises `ConfigError` naming the key
and the fix (exit code 2 from the CLI). Field names follow Megatron-LM's flags in
snake_case where one exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from megamod.errors import ConfigError

# `moe`: the experts and routers of the MoE layers; `ffn`: every decoder layer's FFN (the
# dense MLPs and the MoE layers' experts, not their routers); `router`: the MoE routers
# (MoE-LLaVA's stage 3 trains `[ffn, router, projector]`); `language` covers the whole
# decoder, experts and routers included.
TRAINABLE_PARTS = ("vision", "projector", "language", "moe", "ffn", "router")


def _require_positive(section: Any, prefix: str, names: tuple[str, ...]) -> None:
    """Sizes and counts below 1 end in a division by zero or an assertion deep inside."""
    for name in names:
        if getattr(section, name) < 1:
            raise ConfigError(f"{prefix}.{name}={getattr(section, name)} must be >= 1")


@dataclass
class VisionConfig:
    """CLIP-style ViT. Defaults: CLIP ViT-L/14 at 336 px, as in LLaVA-1.5."""

    image_size: int = 336
    patch_size: int = 14
    num_layers: int = 24
    hidden_size: int = 1024
    ffn_hidden_size: int = 4096
    num_attention_heads: int = 16
    # LLaVA-1.5 feeds the projector the second-to-last layer's output; layers after it
    # are not built. The CLS token is dropped.
    feature_layer: int = -2
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"
    layernorm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        _require_positive(self, "model.vision", ("image_size", "patch_size", "num_layers",
                                                 "hidden_size", "ffn_hidden_size",
                                                 "num_attention_heads"))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.vision.hidden_size={self.hidden_size} is not divisible by "
                f"model.vision.num_attention_heads={self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.vision.image_size={self.image_size} is not a multiple of "
                f"model.vision.patch_size={self.patch_size}: change one of them"
            )
        if not -self.num_layers <= self.feature_layer < 0:
            raise ConfigError(
                f"model.vision.feature_layer={self.feature_layer} must be in "
                f"[-{self.num_layers}, -1] (negative, counted from the last layer)"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_built_layers(self) -> int:
        return self.num_layers + self.feature_layer + 1


@dataclass
class ProjectorConfig:
    """LLaVA-1.5's `mlp2x_gelu`: Linear(vision, lang) -> GELU -> Linear(lang, lang)."""

    projector_type: Literal["mlp2x_gelu"] = "mlp2x_gelu"


@dataclass
class LanguageConfig:
    """Llama-style decoder: RMSNorm, SwiGLU, RoPE, grouped-query attention."""

    num_layers: int = 32
    hidden_size: int = 4096
    ffn_hidden_size: int = 11008
    num_attention_heads: int = 32
    # None means one key/value head per query head (multi-head attention).
    num_query_groups: Optional[int] = None
    seq_length: int = 2048
    # None: the tokenizer's size, padded to a multiple of
    # make_vocab_size_divisible_by x tensor_model_parallel_size (as Megatron-LM does).
    vocab_size: Optional[int] = None
    make_vocab_size_divisible_by: int = 128
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    swiglu: bool = True
    rotary_base: int = 10000
    layernorm_epsilon: float = 1e-5
    untie_embeddings_and_output_weights: bool = True

    def __post_init__(self) -> None:
        _require_positive(self, "model.language", ("num_layers", "hidden_size", "ffn_hidden_size",
                                                   "num_attention_heads", "seq_length",
                                                   "make_vocab_size_divisible_by"))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.language.hidden_size={self.hidden_size} is not divisible by "
                f"model.language.num_attention_heads={self.num_attention_heads}"
            )
        groups = self.num_query_groups
        if groups is not None and self.num_attention_heads % groups:
            raise ConfigError(
                f"model.language.num_attention_heads={self.num_attention_heads} is not "
                f"divisible by model.language.num_query_groups={groups}"
            )


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    init_method_std: float = 0.02


@dataclass
class MoEConfig:
    """Mixture-of-experts decoder layers (megatron-core's MoELayer), MoE-LLaVA's settings as
    defaults. Names are Megatron-LM's `--moe-*` flags without the prefix."""

    # None: a dense decoder. MoE-LLaVA: 4.
    num_experts: Optional[int] = None
    router_topk: int = 2
    # An int K puts MoE on layers 0, K, 2K, ... (MoE-LLaVA's "sparse" mode is K = 2); a
    # list gives 1 (MoE) or 0 (dense) per decoder layer.
    layer_freq: int | list[int] = 2
    # The load-balancing loss E * sum_i f_i * P_i per MoE layer, summed over layers (see
    # megamod.moe for how it relates to MoE-LLaVA's DeepSpeed gate).
    aux_loss_coeff: float = 0.01
    # ST-MoE's router z-loss; 0 = off (MoE-LLaVA uses none).
    z_loss_coeff: float = 0.0
    # None: dropless. Otherwise each expert takes at most capacity_factor x its fair share
    # of tokens per micro-batch (MoE-LLaVA trains with 1.5); the rest skip the experts.
    capacity_factor: Optional[float] = None
    # The capacity factor while the model is not training (`model.eval()`: evaluation,
    # generation), as DeepSpeed's `eval_capacity_factor`; None = dropless there. MoE-LLaVA
    # evaluates with 2.0, which drops nothing with 4 experts and top-2.
    eval_capacity_factor: Optional[float] = None
    # Which tokens an over-full expert drops (gate `megatron`): the lowest router
    # probabilities or the last.
    token_drop_policy: Literal["probs", "position"] = "probs"
    # `megatron`: megatron-core's TopKRouter. `deepspeed_top2`: MoE-LLaVA's gate, DeepSpeed
    # 0.9.5's top2gating (second expert drawn with Gumbel noise, capacity and dropping in
    # DeepSpeed's token order over the whole micro-batch, weights renormalised after a drop,
    # aux loss over first choices): megamod.moe.deepspeed_gate.
    gate: Literal["megatron", "deepspeed_top2"] = "megatron"
    pad_expert_input_to_capacity: bool = False
    token_dispatcher_type: Literal["alltoall", "allgather"] = "alltoall"
    router_dtype: Literal["fp32", "fp64"] = "fp32"
    # The experts' FFN width; None = model.language.ffn_hidden_size (upcycling copies it).
    ffn_hidden_size: Optional[int] = None

    def __post_init__(self) -> None:
        if self.num_experts is None:
            return
        if self.num_experts < 2:
            raise ConfigError(f"moe.num_experts={self.num_experts} must be >= 2 (null = dense)")
        if not 1 <= self.router_topk <= self.num_experts:
            raise ConfigError(
                f"moe.router_topk={self.router_topk} must be between 1 and "
                f"moe.num_experts={self.num_experts}"
            )
        if isinstance(self.layer_freq, int) and self.layer_freq < 1:
            raise ConfigError(f"moe.layer_freq={self.layer_freq} must be >= 1")
        if isinstance(self.layer_freq, list) and set(self.layer_freq) - {0, 1}:
            raise ConfigError(f"moe.layer_freq={self.layer_freq}: a list holds 0 or 1 per layer")
        for name in ("aux_loss_coeff", "z_loss_coeff"):
            if getattr(self, name) < 0:
                raise ConfigError(f"moe.{name} must be >= 0")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(
                f"moe.capacity_factor={self.capacity_factor} must be > 0 (null = dropless)"
            )
        if self.pad_expert_input_to_capacity and self.capacity_factor is None:
            raise ConfigError(
                "moe.pad_expert_input_to_capacity=true needs moe.capacity_factor: set one"
            )
        self._check_eval_capacity_and_gate()

    def _check_eval_capacity_and_gate(self) -> None:
        factor = self.eval_capacity_factor
        if factor is not None and factor <= 0:
            raise ConfigError(
                f"moe.eval_capacity_factor={factor} must be > 0 (null = dropless at evaluation)"
            )
        if factor is not None and self.capacity_factor is None:
            # megatron-core's dispatchers size their buffers for dropless routing then.
            raise ConfigError(
                f"moe.eval_capacity_factor={factor} needs moe.capacity_factor (training "
                "dropless, evaluation dropping is not supported): set one, or null both"
            )
        if self.pad_expert_input_to_capacity and factor != self.capacity_factor:
            raise ConfigError(
                "moe.pad_expert_input_to_capacity=true pads every forward to "
                f"moe.capacity_factor={self.capacity_factor}'s capacity: set "
                f"moe.eval_capacity_factor to the same value (it is {factor})"
            )
        if self.gate == "deepspeed_top2":
            if self.router_topk != 2:
                raise ConfigError(
                    f"moe.gate=deepspeed_top2 routes to 2 experts: set moe.router_topk=2 "
                    f"(it is {self.router_topk})"
                )
            if self.pad_expert_input_to_capacity:
                raise ConfigError(
                    "moe.gate=deepspeed_top2 caps experts per micro-batch, not per rank, so a "
                    "rank's expert inputs have no fixed size: set "
                    "moe.pad_expert_input_to_capacity=false"
                )

    def layer_pattern(self, num_layers: int) -> list[int]:
        """1 (MoE) or 0 (dense) per decoder layer; all 0 for a dense model."""
        if self.num_experts is None:
            return [0] * num_layers
        if isinstance(self.layer_freq, int):
            return [int(i % self.layer_freq == 0) for i in range(num_layers)]
        return list(self.layer_freq)


@dataclass
class MoDConfig:
    """p-MoD's Mixture-of-Depths vision-token dropping (arXiv 2412.04449). Defaults are the
    official code's (MCG-NJU/p-MoD: PRD `shiftedcos_decay_0.85_0.15`, TanhNorm `tanh_0.2_1`)."""

    enabled: bool = False
    # "prd": progressive ratio decay, r(l) = cos(l * pi / (L - 1)) / 2 + 0.5; layer l drops
    # tokens where r(l) <= prd_threshold, keeping max(r(l), prd_min_ratio) of them.
    # "fixed": `ratio` on the layers named by `layers`.
    schedule: Literal["prd", "fixed"] = "prd"
    prd_threshold: float = 0.85
    prd_min_ratio: float = 0.15
    ratio: float = 0.5
    # "interleave" (1, 3, 5, ...), "deep_all" (2 .. L-2), or a list of layer indices.
    layers: str | list[int] = "interleave"
    # The router weight w = scale * f(logit) + bias, as "<f>_<scale>_<bias>" with f one of
    # tanh (TanhNorm), sigmoid, none.
    weight_norm: str = "tanh_0.2_1"
    # Which tokens a layer may skip: vision tokens (`<image>` positions) only.
    candidates: Literal["vision"] = "vision"
    # The kept tokens of a micro-batch are padded to a multiple of this (a multiple of every
    # TP size in use, so shapes, and results, are the same at every TP size). 8 divides TP
    # 1, 2, 4 and 8 and keeps GEMM shapes tensor-core aligned; a larger one only pads more
    # (64 cost ~5 % of the MoD step on the CPU benchmark).
    kept_length_multiple: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.prd_min_ratio <= 1 or not 0 < self.prd_threshold <= 1:
            raise ConfigError("mod.prd_min_ratio and mod.prd_threshold must be in (0, 1]")
        if not 0 < self.ratio <= 1:
            raise ConfigError(f"mod.ratio={self.ratio} must be in (0, 1]")
        if isinstance(self.layers, str) and self.layers not in ("interleave", "deep_all"):
            raise ConfigError(
                f"mod.layers={self.layers!r}: use interleave, deep_all or a list of layer indices"
            )
        parts = self.weight_norm.split("_")
        try:
            ok = len(parts) == 3 and parts[0] in ("tanh", "sigmoid", "none")
            float(parts[1]), float(parts[2])
        except (ValueError, IndexError):
            ok = False
        if not ok:
            raise ConfigError(
                f"mod.weight_norm={self.weight_norm!r} is not <tanh|sigmoid|none>_<scale>_<bias>"
                " (p-MoD's TanhNorm: tanh_0.2_1)"
            )
        if self.kept_length_multiple < 1:
            raise ConfigError("mod.kept_length_multiple must be >= 1")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    # Pipeline stages: the decoder's layers split over them in order, the vision encoder and
    # projector (and the embedding) on the first, the output layer and loss on the last.
    pipeline_model_parallel_size: int = 1
    # Decoder layers on the first / last stage (None: an even split of what is left). The
    # first stage also runs the vision encoder: give it fewer decoder layers.
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None
    expert_model_parallel_size: int = 1
    # Tensor parallelism inside each expert; None = tensor_model_parallel_size. With
    # expert_model_parallel_size=2 on the 2 ranks of TP=2, set it to 1.
    expert_tensor_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    # A collective that waits longer than this fails (naming its rank) instead of hanging.
    distributed_timeout_minutes: int = 10

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "expert_model_parallel_size", "distributed_timeout_minutes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1")
        if self.expert_tensor_parallel_size is not None and self.expert_tensor_parallel_size < 1:
            raise ConfigError("parallel.expert_tensor_parallel_size must be >= 1 (or null)")
        for name in ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"):
            value = getattr(self, name)
            if value is not None and (value < 1 or self.pipeline_model_parallel_size == 1):
                raise ConfigError(
                    f"parallel.{name}={value} needs pipeline_model_parallel_size > 1 and a "
                    f"value >= 1: set it to null or raise pipeline_model_parallel_size"
                )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError(
                "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1:"
                " set sequence_parallel=false or raise tensor_model_parallel_size"
            )


@dataclass
class MixtureSource:
    """One source of `data.mixture`: its shards (as `data.train_shards`) and its weight."""

    shards: str = ""
    # Relative share of the sample stream (weights need not sum to 1).
    weight: float = 1.0


@dataclass
class DataConfig:
    # Shards made by `megamod build-shards`: a directory holding manifest.json, a glob of
    # .tar files (`dir/*.tar`), or a brace pattern (`dir/name-{000000..000009}.tar`).
    # "tiny": the bundled data set, built into shards on first use. null with a mixture.
    train_shards: Optional[str] = "tiny"
    # Several sources drawn in proportion to their weights (e.g. stage 2's MIMIC-IT + LRV
    # + SViT + LVIS); replaces train_shards, which must then be null (or left at "tiny").
    mixture: list[MixtureSource] = field(default_factory=list)
    # "tiny" or a local Hugging Face tokenizer directory.
    tokenizer: str = "tiny"
    conversation_template: Literal["plain", "vicuna_v1", "llama3"] = "plain"
    image_aspect_ratio: Literal["pad", "resize"] = "pad"
    # "auto": NVIDIA DALI when installed (GPU decode with a GPU, else CPU), else Pillow.
    image_decoder: Literal["auto", "dali", "python"] = "auto"
    # Threads reading shards and decoding images (DALI's num_threads, or Pillow's pool).
    num_workers: int = 4
    # Steps prepared ahead in a background thread; 0 prepares each step when asked.
    prefetch_steps: int = 2
    # Unusable samples (corrupt image, invalid conversation) are replaced and counted;
    # above this fraction of the samples read the run stops with a DataError.
    max_skip_fraction: float = 0.01
    # Reshuffle every epoch from this seed (the data position is checkpointed).
    seed: int = 1234
    # Sequence packing: whole samples (never split) packed into rows of
    # model.language.seq_length, attention and RoPE positions restarting at each sample.
    # A step is train.global_batch_size ROWS (as Megatron-LM's packed SFT counts it), filled
    # first-fit from the global sample order; the data position stays "samples consumed".
    packing: bool = False
    # Without packing: `longest` pads each micro-batch to its longest sample (rounded up to
    # pad_to_multiple, and to the TP size under sequence parallelism), as the official
    # LLaVA code does; `max_length` pads every sample to model.language.seq_length.
    padding: Literal["longest", "max_length"] = "longest"
    pad_to_multiple: int = 8
    # Without packing: sort each step's samples on a rank by length before cutting them into
    # micro-batches, so that micro-batches hold samples of similar length and pad less.
    # (LLaVA's group_by_modality_length does otherwise: it gives every rank's micro-batch
    # one of a random megabatch's longest samples, to even the ranks' work.)
    group_by_length: bool = False
    # Images over this many pixels (width x height, read from the header before decoding)
    # or this many bytes are skipped and counted like any unusable sample; a 13000 x 13000
    # JPEG would otherwise take ~10 GB to decode.
    max_image_pixels: int = 40_000_000
    max_image_bytes: int = 64 * 2**20

    def __post_init__(self) -> None:
        if self.mixture and self.train_shards not in (None, "tiny"):
            raise ConfigError(
                f"data.train_shards={self.train_shards!r} and data.mixture are both set: "
                "put the shards in data.mixture (one source per data set) and set "
                "train_shards to null"
            )
        if not self.mixture and self.train_shards is None:
            raise ConfigError("data.train_shards is null and data.mixture is empty: give shards")
        for i, source in enumerate(self.mixture):
            if not source.shards:
                raise ConfigError(f"data.mixture[{i}].shards is empty: give a shard directory, glob or brace pattern")
            if not 0 < source.weight < float("inf"):
                raise ConfigError(f"data.mixture[{i}].weight={source.weight} must be a positive number")
        if self.num_workers < 1:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 1")
        if self.prefetch_steps < 0:
            raise ConfigError(f"data.prefetch_steps={self.prefetch_steps} must be >= 0")
        if not 0 <= self.max_skip_fraction < 1:
            raise ConfigError(f"data.max_skip_fraction={self.max_skip_fraction} must be in [0, 1)")
        _require_positive(self, "data", ("pad_to_multiple", "max_image_pixels", "max_image_bytes"))


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_iters: int = 100
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_warmup_fraction: float = 0.03
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    # Activation recomputation in the decoder (Megatron-LM's flags; megatron-core does it,
    # megamod.models.transformer_configs maps them). null: off. `full`: whole layers, their
    # input alone kept, rerun in backward; `recompute_method` `uniform` checkpoints the
    # layers in groups of `recompute_num_layers`, `block` only the first
    # `recompute_num_layers` layers. `selective`: every layer's `recompute_modules`
    # (default [core_attn]): core_attn, mlp (dense MLPs), moe (whole MoE layers), and with
    # transformer-engine moe_act (the grouped-GEMM experts' activation) and layernorm.
    recompute_granularity: Optional[Literal["full", "selective"]] = None
    recompute_method: Optional[Literal["uniform", "block"]] = None
    recompute_num_layers: Optional[int] = None
    recompute_modules: Optional[list[Literal["core_attn", "mlp", "moe", "moe_act", "layernorm",
                                             "mla_up_proj", "shared_experts"]]] = None
    # Which parts train; the others are frozen (no gradients, no optimizer state).
    trainable: list[str] = field(default_factory=lambda: ["vision", "projector", "language"])

    def __post_init__(self) -> None:
        _require_positive(self, "train", ("micro_batch_size", "global_batch_size", "train_iters"))
        self._check_optimizer()
        if self.lr < self.min_lr:
            raise ConfigError(
                f"train.lr={self.lr} is below train.min_lr={self.min_lr}: the schedule decays "
                f"from lr to min_lr, so lower min_lr or raise lr"
            )
        unknown = sorted(set(self.trainable) - set(TRAINABLE_PARTS))
        if unknown:
            raise ConfigError(
                f"train.trainable has unknown part(s) {unknown}: choose from {list(TRAINABLE_PARTS)}"
            )
        if not self.trainable:
            raise ConfigError("train.trainable is empty: name at least one part to train")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        if not 0.0 <= self.lr_warmup_fraction < 1.0:
            raise ConfigError("train.lr_warmup_fraction must be in [0, 1)")
        self._check_recompute()

    def _check_optimizer(self) -> None:
        """Adam's and the schedule's ranges (torch would otherwise refuse them later, in
        its own words, or a NaN would train)."""
        for key in ("lr", "min_lr", "weight_decay", "clip_grad"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"train.{key}={value} must be a finite number >= 0")
        for key in ("adam_beta1", "adam_beta2"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"train.{key}={value} must be in [0, 1) (Adam's default: "
                                  f"{0.9 if key == 'adam_beta1' else 0.999})")
        if not (math.isfinite(self.adam_eps) and self.adam_eps > 0):
            raise ConfigError(f"train.adam_eps={self.adam_eps} must be a finite number > 0")

    def _check_recompute(self) -> None:
        """megatron-core's TransformerConfig rules, named by our keys; what needs the model
        (layer count, MoE, grouped GEMM) is checked where it is mapped."""
        granularity = self.recompute_granularity
        if granularity != "full":
            for key in ("recompute_method", "recompute_num_layers"):
                if getattr(self, key) is not None:
                    raise ConfigError(
                        f"train.{key}={getattr(self, key)} applies to "
                        f"train.recompute_granularity=full only (it is "
                        f"{granularity or 'null'}): set recompute_granularity=full or drop {key}"
                    )
        if granularity != "selective" and self.recompute_modules is not None:
            raise ConfigError(
                f"train.recompute_modules={self.recompute_modules} applies to "
                f"train.recompute_granularity=selective only (it is {granularity or 'null'}): "
                "set recompute_granularity=selective or drop recompute_modules"
            )
        if granularity == "full":
            if self.recompute_method is None:
                raise ConfigError(
                    "train.recompute_granularity=full needs train.recompute_method: uniform "
                    "(every layer, in groups of recompute_num_layers) or block (the first "
                    "recompute_num_layers layers)"
                )
            if self.recompute_num_layers is None or self.recompute_num_layers < 1:
                raise ConfigError(
                    f"train.recompute_granularity=full needs train.recompute_num_layers >= 1 "
                    f"(it is {self.recompute_num_layers}): layers per recomputed group "
                    "(uniform) or layers recomputed (block)"
                )
        if granularity == "selective" and self.recompute_modules is not None:
            if not self.recompute_modules:
                raise ConfigError(
                    "train.recompute_modules is empty: name a module (e.g. [core_attn]) or set "
                    "train.recompute_granularity=null"
                )
            absent = {"mla_up_proj": "multi-latent attention",
                      "shared_experts": "shared experts in its MoE layers"}
            for module, what in absent.items():
                if module in self.recompute_modules:
                    raise ConfigError(
                        f"train.recompute_modules names {module}, but megamod's decoder has no "
                        f"{what}: drop it"
                    )


@dataclass
class PrecisionConfig:
    """Numeric formats (megamod.precision maps them onto megatron-core). Names are
    Megatron-LM's flags (`--fp8-format` is `fp8`)."""

    # Parameters and activations; optimizer main params and gradient reduction stay fp32.
    params_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    # fp16 loss scaling. `loss_scale`: a static scale; null: dynamic, starting at
    # initial_loss_scale, halved after `hysteresis` overflowing steps (never below
    # min_loss_scale), doubled after loss_scale_window steps without one.
    loss_scale: Optional[float] = None
    initial_loss_scale: float = 2.0**32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2
    # FP8 GEMMs in the decoder's transformer-engine layers (needs transformer-engine and a
    # Hopper or newer GPU); null: off. e4m3 everywhere, or hybrid (e5m2 gradients). The
    # rest runs in params_dtype (bf16 is the usual partner).
    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    # How FP8 scales are found: delayed (amax history), tensorwise (current scaling),
    # blockwise, mxfp8 (Blackwell).
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    fp8_amax_history_len: int = 1
    fp8_amax_compute_algo: Literal["most_recent", "max"] = "most_recent"

    def __post_init__(self) -> None:
        _require_positive(self, "precision", ("loss_scale_window", "hysteresis",
                                              "fp8_amax_history_len"))
        for name in ("initial_loss_scale", "min_loss_scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"precision.{name}={getattr(self, name)} must be > 0")
        if self.min_loss_scale > self.initial_loss_scale:
            raise ConfigError(
                f"precision.min_loss_scale={self.min_loss_scale} is above "
                f"precision.initial_loss_scale={self.initial_loss_scale}: lower it"
            )
        if self.loss_scale is not None:
            if not self.loss_scale > 0:
                raise ConfigError(
                    f"precision.loss_scale={self.loss_scale} must be > 0 (null = dynamic)"
                )
            if self.params_dtype != "fp16":
                raise ConfigError(
                    f"precision.loss_scale is set but precision.params_dtype={self.params_dtype}: "
                    f"loss scaling is for fp16 only; remove loss_scale"
                )


@dataclass
class StabilityConfig:
    """What a run does about bad steps (megamod.training.stability)."""

    # A non-finite loss or gradient on any rank: "skip" the update on every rank (no
    # parameter, optimizer-state or LR-schedule change; counted in train/skipped_steps), or
    # "stop" the run (Megatron-LM's --check-for-nan-in-loss-and-grad). An fp16 overflow
    # that the dynamic loss scale can still absorb is neither (train/overflow_steps).
    on_nonfinite: Literal["skip", "stop"] = "skip"
    # A loss or gradient norm more than spike_zscore standard deviations above the mean
    # of the last spike_window applied steps is a spike (train/spikes): "skip" its update
    # like a non-finite one, or only "log" it. null: no spike check.
    spike_zscore: Optional[float] = None
    spike_window: int = 100
    on_spike: Literal["skip", "log"] = "skip"
    # After this many skipped steps in a row, reload the last good checkpoint (null: never).
    max_consecutive_skips: Optional[int] = 10
    # ... and skip this many steps' batches from its data position on (PaLM's remedy for
    # spikes); null: the batches since the checkpoint, up to the last skipped step.
    skip_batches_on_rollback: Optional[int] = None
    # Past this many rollbacks the run stops with an error; the last good checkpoint stays.
    max_rollbacks: int = 3
    # Fault injection for tests, each once per run: poison the gradient of these iterations
    # with a NaN, or scale it by 1e6 (a gradient-norm spike), on the last rank.
    inject_nan_at: Optional[int | list[int]] = None
    inject_spike_at: Optional[int | list[int]] = None

    def __post_init__(self) -> None:
        if self.spike_zscore is not None and not self.spike_zscore > 0:
            raise ConfigError(
                f"stability.spike_zscore={self.spike_zscore} must be > 0 (null = off)"
            )
        if self.spike_window < 2:
            raise ConfigError(
                f"stability.spike_window={self.spike_window} must be >= 2 (a standard "
                f"deviation needs two steps)"
            )
        if self.max_consecutive_skips is not None and self.max_consecutive_skips < 1:
            raise ConfigError(
                f"stability.max_consecutive_skips={self.max_consecutive_skips} must be >= 1 "
                f"(null = never roll back)"
            )
        if self.skip_batches_on_rollback is not None and self.skip_batches_on_rollback < 0:
            raise ConfigError(
                f"stability.skip_batches_on_rollback={self.skip_batches_on_rollback} must be "
                f">= 0 (null = the batches since the checkpoint)"
            )
        if self.max_rollbacks < 0:
            raise ConfigError(f"stability.max_rollbacks={self.max_rollbacks} must be >= 0")

    def nan_iterations(self) -> set[int]:
        return _iterations(self.inject_nan_at)

    def spike_iterations(self) -> set[int]:
        return _iterations(self.inject_spike_at)


def _iterations(value: Optional[int | list[int]]) -> set[int]:
    if value is None:
        return set()
    return set(value if isinstance(value, list) else [value])


@dataclass
class LoggingConfig:
    log_interval: int = 1
    tensorboard_dir: Optional[str] = None
    # MoE: a layers x experts expert-load image (all | text | image tokens) every N
    # iterations, at a log step; 0 = never.
    moe_heatmap_interval: int = 100

    def __post_init__(self) -> None:
        if self.log_interval < 1:
            raise ConfigError(f"logging.log_interval={self.log_interval} must be >= 1")
        if self.moe_heatmap_interval < 0:
            raise ConfigError("logging.moe_heatmap_interval must be >= 0 (0 = never)")


@dataclass
class CheckpointConfig:
    save_dir: Optional[str] = None
    # Save every N iterations (and always at the end when save_dir is set).
    save_interval: Optional[int] = None
    # A save_dir to resume from (its latest_checkpointed_iteration.txt).
    load: Optional[str] = None
    # Load model weights only (stage transitions): no optimizer, scheduler, RNG, data.
    finetune: bool = False
    # Once save_dir holds a checkpoint, resume from it (everything, not finetune), whatever
    # `load` says: a requeued or resubmitted job continues where it stopped.
    auto_resume: bool = True


@dataclass
class EvalTask:
    """One benchmark of `eval.tasks`: a `megamod eval` task on a small question set."""

    # A `megamod eval --task` name: pope, scienceqa_img, textvqa, vqav2, gqa, mme, mmbench,
    # mmbench_cn. Each task once: its scores are logged as `eval/<task>/<metric>`.
    task: str = ""
    # As `megamod eval`'s --questions, --images and --annotations (mmbench: its TSV,
    # which holds the images; no images folder).
    questions: str = ""
    images: Optional[str] = None
    annotations: list[str] = field(default_factory=list)
    max_new_tokens: int = 128
    batch_size: int = 8
    # The first `limit` questions of the file (MMBench: rounds; a row cut short is not
    # scored). null: all of them.
    limit: Optional[int] = None


@dataclass
class EvalConfig:
    """Evaluation during training (Megatron-LM's `--eval-interval` / `--eval-iters`)."""

    # Every `interval` steps (and after the last one): the loss on held-out shards,
    # `eval/loss` in TensorBoard, `eval/loss/<i>` per source when there are several, and
    # the routing at evaluation (`eval/moe/...`, `eval/mod/...`); and the `tasks`'
    # scores. null: never.
    interval: Optional[int] = None
    # Held-out shards, one source each (as data.train_shards: a directory, glob, brace
    # pattern or "tiny"); with an interval, these or `tasks` (or both).
    shards: list[str] = field(default_factory=list)
    # Steps of train.global_batch_size samples (rows, packed) read per source at each
    # evaluation: the same ones every time, so the figures compare across evaluations.
    iters: int = 1
    # Benchmarks answered by the training model itself, greedily, as `megamod eval` answers
    # them (the questions split over the data-parallel ranks): `eval/<task>/<metric>`.
    # Needs the whole model on every rank (tensor, pipeline and expert parallel size 1).
    tasks: list[EvalTask] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require_positive(self, "eval", ("iters",))
        if self.interval is not None and self.interval < 1:
            raise ConfigError(f"eval.interval={self.interval} must be >= 1 (or null: no evaluation)")
        if self.interval is not None and not self.shards and not self.tasks:
            raise ConfigError("eval.interval is set but eval.shards and eval.tasks are empty: give "
                              "held-out shards or benchmark tasks")
        if self.tasks and self.interval is None:
            raise ConfigError("eval.tasks is set but eval.interval is null: set how many steps apart "
                              "to evaluate")
        seen: dict[str, int] = {}
        for i, task in enumerate(self.tasks):
            key = f"eval.tasks[{i}]"
            for name in ("task", "questions"):
                if not getattr(task, name):
                    raise ConfigError(f"{key}.{name} is empty: give it (as megamod eval's --{name})")
            if task.task in seen:
                raise ConfigError(f"{key}.task={task.task!r} repeats eval.tasks[{seen[task.task]}]: its "
                                  f"scores share the tags eval/{task.task}/...: give each task once")
            seen[task.task] = i
            _require_positive(task, key, ("max_new_tokens", "batch_size"))
            if task.limit is not None and task.limit < 1:
                raise ConfigError(f"{key}.limit={task.limit} must be >= 1 (or null: every question)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mod: MoDConfig = field(default_factory=MoDConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        language, tp = self.model.language, self.parallel.tensor_model_parallel_size
        if language.num_attention_heads % tp:
            raise ConfigError(
                f"model.language.num_attention_heads={language.num_attention_heads} is not "
                f"divisible by parallel.tensor_model_parallel_size={tp}: pick a TP size "
                f"that divides the head count"
            )
        groups = language.num_query_groups or language.num_attention_heads
        if groups % tp:
            raise ConfigError(
                f"model.language.num_query_groups={groups} is not divisible by "
                f"parallel.tensor_model_parallel_size={tp}"
            )
        vision = self.model.vision
        if vision.num_attention_heads % tp:
            raise ConfigError(
                f"model.vision.num_attention_heads={vision.num_attention_heads} is not "
                f"divisible by parallel.tensor_model_parallel_size={tp}"
            )
        if self.parallel.sequence_parallel and language.seq_length % tp:
            raise ConfigError(
                f"model.language.seq_length={language.seq_length} is not divisible by "
                f"parallel.tensor_model_parallel_size={tp}, which sequence_parallel needs: "
                f"round seq_length to a multiple of {tp}"
            )
        if self.checkpoint.save_interval is not None and self.checkpoint.save_dir is None:
            raise ConfigError("checkpoint.save_interval is set but checkpoint.save_dir is not")
        for key, size in (("model.language.ffn_hidden_size", language.ffn_hidden_size),
                          ("model.vision.ffn_hidden_size", vision.ffn_hidden_size),
                          ("model.language.vocab_size", language.vocab_size or tp)):
            if size % tp:
                raise ConfigError(
                    f"{key}={size} is not divisible by parallel.tensor_model_parallel_size={tp}"
                )
        # Found here, not at the first save after hours of training.
        for key, path in (("checkpoint.save_dir", self.checkpoint.save_dir),
                          ("logging.tensorboard_dir", self.logging.tensorboard_dir),
                          ("checkpoint.load", self.checkpoint.load)):
            if path is not None and Path(path).is_file():
                raise ConfigError(f"{key}={path} is a file: it must name a directory")
        self._check_moe()
        self._check_mod()
        self._check_pipeline()
        self._check_eval()

    def pipeline_stage_layers(self) -> list[int]:
        """Decoder layers per pipeline stage, as megatron-core splits them (the first and
        last stages' counts when set, the rest evenly)."""
        parallel, num_layers = self.parallel, self.model.language.num_layers
        pp = parallel.pipeline_model_parallel_size
        first, last = parallel.num_layers_in_first_pipeline_stage, parallel.num_layers_in_last_pipeline_stage
        if pp == 1:
            return [num_layers]
        middle = pp - (first is not None) - (last is not None)
        rest = num_layers - (first or 0) - (last or 0)
        if rest < 0 or (middle and rest % middle) or (not middle and rest):
            raise ConfigError(
                f"model.language.num_layers={num_layers} cannot be split over "
                f"parallel.pipeline_model_parallel_size={pp} stages with "
                f"num_layers_in_first_pipeline_stage={first} and "
                f"num_layers_in_last_pipeline_stage={last}: the stages without a set count "
                f"must share the remaining {rest} layers evenly"
            )
        even = rest // middle if middle else 0
        if middle and even == 0:
            raise ConfigError(
                f"model.language.num_layers={num_layers} leaves no decoder layer for some of "
                f"the parallel.pipeline_model_parallel_size={pp} stages: lower it"
            )
        return [first if first is not None else even, *[even] * (pp - 2),
                last if last is not None else even]

    def _check_pipeline(self) -> None:
        stages = self.pipeline_stage_layers()
        train = self.train
        if (len(stages) > 1 and self.moe.num_experts is not None
                and self.moe.token_dispatcher_type == "allgather"):
            raise ConfigError(
                "moe.token_dispatcher_type=allgather cannot run with "
                "parallel.pipeline_model_parallel_size > 1 (megatron-core refuses it beside the "
                "variable-length activations the stages exchange): use alltoall"
            )
        if (train.recompute_method == "uniform" and train.recompute_num_layers
                and any(n % train.recompute_num_layers for n in stages)):
            raise ConfigError(
                f"train.recompute_method=uniform recomputes groups of "
                f"train.recompute_num_layers={train.recompute_num_layers} layers within each "
                f"pipeline stage, which hold {stages} decoder layers: pick a divisor of each, "
                f"or recompute_method=block"
            )

    def _check_eval(self) -> None:
        """Benchmarks during training run `megamod eval`'s generator on the training model,
        which must then be whole on every rank."""
        parallel = self.parallel
        split = {
            "tensor_model_parallel_size": parallel.tensor_model_parallel_size,
            "pipeline_model_parallel_size": parallel.pipeline_model_parallel_size,
            "expert_model_parallel_size": parallel.expert_model_parallel_size,
            "expert_tensor_parallel_size": parallel.expert_tensor_parallel_size or 1,
        }
        split = {k: v for k, v in split.items() if v > 1}
        if self.eval.tasks and split:
            k, v = next(iter(split.items()))
            raise ConfigError(
                f"eval.tasks answers questions with the training model, which must be whole on "
                f"every rank (the generator runs one model per rank), but parallel.{k}={v} "
                f"splits it: drop eval.tasks and run `megamod eval` on the saved checkpoints"
            )

    def _check_mod(self) -> None:
        mod, tp = self.mod, self.parallel.tensor_model_parallel_size
        if not mod.enabled:
            return
        num_layers = self.model.language.num_layers
        if isinstance(mod.layers, list) and not all(0 <= i < num_layers for i in mod.layers):
            raise ConfigError(
                f"mod.layers={mod.layers} names layers outside 0..{num_layers - 1} "
                f"(model.language.num_layers={num_layers})"
            )
        if self.parallel.sequence_parallel and mod.kept_length_multiple % tp:
            raise ConfigError(
                f"mod.kept_length_multiple={mod.kept_length_multiple} is not a multiple of "
                f"parallel.tensor_model_parallel_size={tp}, which sequence parallelism needs"
            )

    def _check_moe(self) -> None:
        moe, parallel = self.moe, self.parallel
        ep = parallel.expert_model_parallel_size
        if moe.num_experts is None:
            if ep > 1:
                raise ConfigError(
                    f"parallel.expert_model_parallel_size={ep} needs MoE layers: set "
                    "moe.num_experts or expert_model_parallel_size=1"
                )
            for part in ("moe", "router"):
                if part in self.train.trainable:
                    raise ConfigError(
                        f"train.trainable names '{part}' but the model has no MoE layers: set "
                        f"moe.num_experts or drop '{part}'"
                    )
            return
        if moe.num_experts % ep:
            raise ConfigError(
                f"moe.num_experts={moe.num_experts} is not divisible by "
                f"parallel.expert_model_parallel_size={ep}: pick an EP size that divides it"
            )
        num_layers = self.model.language.num_layers
        if isinstance(moe.layer_freq, list) and len(moe.layer_freq) != num_layers:
            raise ConfigError(
                f"moe.layer_freq has {len(moe.layer_freq)} entries but the decoder has "
                f"model.language.num_layers={num_layers}: give one 0/1 per layer"
            )
        if not any(moe.layer_pattern(num_layers)):
            raise ConfigError(f"moe.layer_freq={moe.layer_freq} puts MoE on no layer")
        # megatron-core's MoELayer refuses to train with TP > 1 unless the sequence is split.
        if parallel.tensor_model_parallel_size > 1 and not parallel.sequence_parallel:
            raise ConfigError(
                "MoE layers with parallel.tensor_model_parallel_size > 1 need "
                "parallel.sequence_parallel=true (megatron-core requires it)"
            )
        etp = parallel.expert_tensor_parallel_size or parallel.tensor_model_parallel_size
        ffn = moe.ffn_hidden_size or self.model.language.ffn_hidden_size
        if ffn % etp:
            raise ConfigError(
                f"the experts' FFN width {ffn} (moe.ffn_hidden_size) is not divisible by "
                f"parallel.expert_tensor_parallel_size={etp}"
            )


# ---------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or start from defaults) and apply `key.sub=value` overrides."""
    raw = {} if path is None else _read_yaml(Path(path), chain=())
    for override in overrides:
        _apply_override(raw, override)
    return build_dataclass(Config, raw, prefix="")


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """One config file as a dict, merged over its `base:` file (recursively)."""
    if path.resolve() in chain:
        raise ConfigError(f"config file {path} is its own base (through {[str(p) for p in chain]})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text: save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: base must be a path to another config file")
    return _merge(_read_yaml(path.parent / base, chain + (path.resolve(),)), raw)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`: mappings merge key by key, anything else (lists too) replaces."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = _merge(merged[key], value)
        merged[key] = value
    return merged


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form key.sub=value")
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(value) if value else ""


def build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    """Build `cls` from a nested dict, checking keys and types; errors name the key."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(
                f"unknown config key {prefix}{key}{hint}; valid keys here: {sorted(fields)}"
            )
    values = {
        key: _convert(hints[key], value, f"{prefix}{key}") for key, value in raw.items()
    }
    return cls(**values)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # `int | list[int]`: the list form when a list is given
            is_list = isinstance(value, list)
            inner = [a for a in inner if (typing.get_origin(a) is list) == is_list]
        return _convert(inner[0], value, key)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_convert(inner, item, f"{key}[{i}]") for i, item in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # PyYAML reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(
            f"{key} must be of type {hint.__name__}, got {value!r} ({type(value).__name__})"
        )
    return value
