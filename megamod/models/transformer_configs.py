"""The one place where megamod's config becomes megatron-core `TransformerConfig`s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core.activations import quick_gelu
from megatron.core.transformer.transformer_config import TransformerConfig

from megamod.config import Config
from megamod.errors import ConfigError
from megamod.models.specs import transformer_engine_available
from megamod.precision import dtype_fields, fp8_fields


@dataclass
class TransformerConfigs:
    vision: TransformerConfig
    projector: TransformerConfig
    language: TransformerConfig


def bias_activation_fusion(
    activation_func: Callable, gated_linear_unit: bool, on_gpu: bool
) -> bool:
    """Whether megatron-core's fused bias + activation kernel computes this MLP's
    activation: only on a GPU (the kernels are CUDA fusions), and only for SwiGLU.
    Its GELU kernels (fusions/fused_bias_gelu.py, fused_bias_geglu.py) are the tanh
    approximation, unlike torch's `F.gelu` and Hugging Face's `gelu` (exact, erf): fused,
    the projector would compute another function on a GPU than on a CPU or in HF."""
    return on_gpu and gated_linear_unit and activation_func is F.silu


def _pipeline(config: Config) -> dict:
    """The decoder's pipeline split. The vision encoder and projector run whole on the
    first stage (their configs keep pipeline_model_parallel_size=1, or megatron-core would
    split the ViT's layers over the stages too), as in megatron-core's `LLaVAModel`."""
    parallel = config.parallel
    if parallel.pipeline_model_parallel_size == 1:
        return {}
    return dict(
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=parallel.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=parallel.num_layers_in_last_pipeline_stage,
        # Rows are padded per micro-batch (or packed), not to seq_length: the stages
        # exchange each activation's shape before the activation. megatron-core refuses
        # this beside its default token dispatcher (allgather) even in a dense decoder,
        # which dispatches nothing: name the other one there (MoE configs name their own).
        variable_seq_lengths=True,
        # A stage's output, once sent on, keeps only its autograd node (Megatron-LM's
        # default): the activation itself is not held until its backward.
        deallocate_pipeline_outputs=True,
        **({"moe_token_dispatcher_type": "alltoall"} if config.moe.num_experts is None else {}),
    )


def _common(config: Config, on_gpu: bool) -> dict:
    parallel = config.parallel
    return dict(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        **dtype_fields(config.precision),
        init_method_std=config.model.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Loss is summed over tokens and divided by the global token count once,
        # so DP size and micro-batch split do not change the gradient.
        calculate_per_token_loss=True,
        # The master weight is built whole and sliced, so TP=N starts from exactly the
        # weights of TP=1 (and a CPU run is reproducible).
        use_cpu_initialization=not on_gpu,
        # Fused kernels exist only for CUDA.
        bias_dropout_fusion=on_gpu,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )


def _moe(config: Config) -> dict:
    """megatron-core's MoE fields; none at all for a dense decoder (TransformerConfig
    refuses MoE settings without experts)."""
    moe = config.moe
    if moe.num_experts is None:
        return {}
    return dict(
        expert_model_parallel_size=config.parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=config.parallel.expert_tensor_parallel_size,
        num_moe_experts=moe.num_experts,
        moe_layer_freq=moe.layer_freq,
        moe_ffn_hidden_size=moe.ffn_hidden_size or config.model.language.ffn_hidden_size,
        moe_router_topk=moe.router_topk,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        # None switches the z-loss off; upstream divides by the coefficient when logging.
        moe_z_loss_coeff=moe.z_loss_coeff or None,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_token_drop_policy=moe.token_drop_policy,
        moe_pad_expert_input_to_capacity=moe.pad_expert_input_to_capacity,
        moe_token_dispatcher_type=moe.token_dispatcher_type,
        moe_router_dtype=moe.router_dtype,
        # Grouped GEMM needs TE's kernels; without them each expert is an MLP (SequentialMLP).
        moe_grouped_gemm=transformer_engine_available(),
    )


def _recompute(config: Config) -> dict:
    """megatron-core's activation recomputation, for the decoder alone: the vision encoder
    and projector never get it, as in Megatron-LM's LLaVA (examples/multimodal recomputes
    the vision model only under its own `--recompute-vision`). What TrainConfig cannot see
    alone is refused here: more layers than the decoder has (an uneven uniform split, where
    the block would index past its last layer, is the config's own check), MoE modules without MoE layers, and what
    megatron-core cannot recompute on this machine or with this precision."""
    train = config.train
    if train.recompute_granularity is None:
        return {}
    num_layers = config.model.language.num_layers
    count = train.recompute_num_layers
    if count is not None and count > num_layers:
        raise ConfigError(
            f"train.recompute_num_layers={count} exceeds model.language.num_layers="
            f"{num_layers}: use at most {num_layers}"
        )
    modules = train.recompute_modules or []
    for module in ("moe", "moe_act"):
        if module in modules and config.moe.num_experts is None:
            raise ConfigError(
                f"train.recompute_modules names {module} but the decoder has no MoE layers: "
                f"drop it or set moe.num_experts"
            )
    if "moe_act" in modules and not transformer_engine_available():
        raise ConfigError(
            "train.recompute_modules names moe_act, which megatron-core recomputes only in "
            "grouped-GEMM experts (transformer-engine on a GPU): drop it, or recompute moe"
        )
    if "layernorm" in modules and not transformer_engine_available():
        # 0.16.1's CheckpointWithoutOutput takes `fp8=False` for "fp8 on" (`fp8 is not
        # None`) and then reads transformer-engine's FP8 state: a NameError without TE.
        raise ConfigError(
            "train.recompute_modules names layernorm, which megatron-core 0.16.1 recomputes "
            "only with transformer-engine (on a GPU): drop it here"
        )
    precision = config.precision
    for module in ("moe_act", "layernorm"):
        if module in modules and precision.fp8 is not None and precision.fp8_recipe == "delayed":
            raise ConfigError(
                f"train.recompute_modules names {module}, which megatron-core cannot recompute "
                f"under precision.fp8_recipe=delayed: drop it or use another fp8_recipe"
            )
    return dict(
        recompute_granularity=train.recompute_granularity,
        recompute_method=train.recompute_method,
        recompute_num_layers=count,
        # None: megatron-core's default, [core_attn] (read only under selective).
        recompute_modules=train.recompute_modules,
    )


def transformer_configs(config: Config, on_gpu: bool | None = None) -> TransformerConfigs:
    """megatron-core's configs of the three parts, for this machine (`on_gpu` None: whether
    CUDA is present) or, given, for a GPU or a CPU one."""
    if on_gpu is None:
        on_gpu = torch.cuda.is_available()
    vision_cfg, language_cfg = config.model.vision, config.model.language
    common = _common(config, on_gpu)
    vision_activation = quick_gelu if vision_cfg.activation == "quick_gelu" else F.gelu
    language_activation = F.silu if language_cfg.swiglu else F.gelu
    vision = TransformerConfig(
        num_layers=vision_cfg.num_built_layers,
        hidden_size=vision_cfg.hidden_size,
        ffn_hidden_size=vision_cfg.ffn_hidden_size,
        num_attention_heads=vision_cfg.num_attention_heads,
        normalization="LayerNorm",
        layernorm_epsilon=vision_cfg.layernorm_epsilon,
        activation_func=vision_activation,
        gated_linear_unit=False,
        bias_activation_fusion=bias_activation_fusion(vision_activation, False, on_gpu),
        add_bias_linear=True,
        add_qkv_bias=True,
        sequence_parallel=False,  # 577 patch tokens do not split evenly over TP
        **common,
    )
    projector = TransformerConfig(
        num_layers=1,
        hidden_size=language_cfg.hidden_size,
        ffn_hidden_size=language_cfg.hidden_size,
        # Unused by an MLP; must only divide by TP for TransformerConfig's check.
        num_attention_heads=config.parallel.tensor_model_parallel_size,
        activation_func=F.gelu,  # LLaVA's mlp2x_gelu: exact GELU
        gated_linear_unit=False,
        bias_activation_fusion=bias_activation_fusion(F.gelu, False, on_gpu),
        add_bias_linear=True,
        sequence_parallel=False,
        **common,
    )
    language = TransformerConfig(
        num_layers=language_cfg.num_layers,
        hidden_size=language_cfg.hidden_size,
        ffn_hidden_size=language_cfg.ffn_hidden_size,
        num_attention_heads=language_cfg.num_attention_heads,
        num_query_groups=language_cfg.num_query_groups,
        normalization=language_cfg.normalization,
        layernorm_epsilon=language_cfg.layernorm_epsilon,
        activation_func=language_activation,
        gated_linear_unit=language_cfg.swiglu,
        bias_activation_fusion=bias_activation_fusion(
            language_activation, language_cfg.swiglu, on_gpu
        ),
        add_bias_linear=False,
        add_qkv_bias=False,
        sequence_parallel=config.parallel.sequence_parallel,
        **common,
        **_pipeline(config),
        **_moe(config),
        **_recompute(config),
        # FP8 GEMMs in the decoder's layers only (megamod.precision).
        **fp8_fields(config),
    )
    return TransformerConfigs(vision=vision, projector=projector, language=language)
