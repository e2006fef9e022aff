"""Numeric precision: the one place where `precision.*` becomes megatron-core settings.

Models, process-group setup and training all read it, so it sits below them; the fp16
loss scaler, which drives the optimizer, is `megamod.training.loss_scaler`.

- `params_dtype` fp32 | bf16 | fp16, through megatron-core's own mixed-precision path:
  `TransformerConfig.bf16/fp16` (the model is wrapped in `Float16Module`: parameters and
  activations in 16 bits, softmax in fp32, routers in `moe.router_dtype`), fp32 gradient
  accumulation and reduction (`DistributedDataParallelConfig.grad_reduce_in_fp32`) and
  `Float16OptimizerWithFloat16Params` (`OptimizerConfig.bf16/fp16`: Adam on fp32 main
  copies of the parameters). On CPU too: megamod.cpu_compat lets that optimizer take CPU
  tensors.
- fp16 adds loss scaling (`megamod.training.loss_scaler`): megatron-core's
  `DynamicGradScaler` with Megatron-LM's settings, or its `ConstantGradScaler` for a
  static `loss_scale`.
- fp8 (`fp8_fields`, `fp8_refusal`): transformer-engine's FP8 GEMMs in the decoder layers
  only. Everything outside the decoder's TE linear layers keeps `params_dtype`: the vision
  encoder and projector (their configs get no fp8 fields; 577 ViT tokens do not meet FP8
  GEMM shapes), the embeddings and output layer (outside the decoder block, whose layers
  alone enter TE's fp8 autocast), norms (TE computes them in high precision), the MoE
  router (a plain GEMM in `moe.router_dtype`) and the MoD router (a torch module, which
  fp8 autocast does not touch). MoE expert inputs are padded to FP8 GEMM shapes: by the
  alltoall dispatcher's routing map (`moe_router_padding_for_quantization`), else by
  `TEGroupedMLP` itself (upstream refuses router padding with allgather).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from megamod.config import Config, PrecisionConfig
from megamod.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Oldest transformer-engine that megatron-core 0.16.1 builds each recipe with
# (fp8_utils.get_fp8_recipe), and the oldest GPU (compute capability) that runs it.
_RECIPE_TE_VERSION = {"delayed": (1, 0), "tensorwise": (2, 2), "blockwise": (2, 3),
                      "mxfp8": (2, 1)}
_RECIPE_CAPABILITY = {"delayed": (9, 0), "tensorwise": (9, 0), "blockwise": (9, 0),
                      "mxfp8": (10, 0)}
_GPU_NAMES = {(9, 0): "Hopper (H100/H200)", (10, 0): "Blackwell (B200)"}


def dtype_fields(precision: PrecisionConfig) -> dict[str, Any]:
    """TransformerConfig fields for the parameter and activation dtype (every part)."""
    dtype = DTYPES[precision.params_dtype]
    return dict(
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision.params_dtype == "bf16",
        fp16=precision.params_dtype == "fp16",
    )


def fp8_fields(config: Config) -> dict[str, Any]:
    """TransformerConfig fields for FP8 in the decoder (none when fp8 is off). The vision
    and projector configs never get them (see the module docstring)."""
    precision = config.precision
    if precision.fp8 is None:
        return {}
    fields = dict(
        fp8=precision.fp8,
        fp8_recipe=precision.fp8_recipe,
        fp8_amax_history_len=precision.fp8_amax_history_len,
        fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
    )
    if config.moe.num_experts is not None and config.moe.token_dispatcher_type == "alltoall":
        fields["moe_router_padding_for_quantization"] = True
    return fields


def optimizer_fields(precision: PrecisionConfig) -> dict[str, Any]:
    """OptimizerConfig fields: which mixed-precision optimizer and its loss scaling."""
    return dict(
        bf16=precision.params_dtype == "bf16",
        fp16=precision.params_dtype == "fp16",
        params_dtype=DTYPES[precision.params_dtype],
        loss_scale=precision.loss_scale,
        initial_loss_scale=precision.initial_loss_scale,
        min_loss_scale=precision.min_loss_scale,
        loss_scale_window=precision.loss_scale_window,
        hysteresis=precision.hysteresis,
    )


def fp8_refusal(
    precision: PrecisionConfig,
    te_version: Optional[tuple[int, int]],
    capability: Optional[tuple[int, int]],
) -> Optional[str]:
    """Why `precision.fp8` cannot run here (None: it can). `te_version`: the importable
    transformer-engine's (major, minor), None without one; `capability`: the GPU's CUDA
    compute capability, None without a GPU. Pure: tests pass the machine they describe."""
    if precision.fp8 is None:
        return None
    recipe = precision.fp8_recipe
    needed_gpu = _RECIPE_CAPABILITY[recipe]
    gpu_name = _GPU_NAMES[needed_gpu]
    off = "or set precision.fp8=null"
    if capability is None:
        return (
            f"precision.fp8={precision.fp8} needs transformer-engine and an NVIDIA "
            f"{gpu_name} or newer GPU (compute capability >= {needed_gpu[0]}.{needed_gpu[1]}); "
            f"this machine has no GPU: run on one with transformer-engine installed "
            f'(pip install -e ".[gpu]"), {off}'
        )
    if capability < needed_gpu:
        return (
            f"precision.fp8={precision.fp8} with precision.fp8_recipe={recipe} needs a "
            f"{gpu_name} or newer GPU (compute capability >= {needed_gpu[0]}.{needed_gpu[1]}); "
            f"this GPU has {capability[0]}.{capability[1]}: use a newer GPU"
            + (" or precision.fp8_recipe=delayed" if recipe == "mxfp8" else "")
            + f", {off} (bf16 runs here)"
        )
    if te_version is None:
        return (
            f"precision.fp8={precision.fp8} needs transformer-engine, which does not import "
            f'here: pip install -e ".[gpu]" (transformer-engine for this CUDA), {off}'
        )
    needed_te = _RECIPE_TE_VERSION[recipe]
    if te_version < needed_te:
        return (
            f"precision.fp8_recipe={recipe} needs transformer-engine >= "
            f"{needed_te[0]}.{needed_te[1]}, this is {te_version[0]}.{te_version[1]}: upgrade "
            f"it or use precision.fp8_recipe=delayed"
        )
    return None


def check_fp8_supported(precision: PrecisionConfig) -> None:
    """Raise ConfigError (exit 2) when `precision.fp8` cannot run on this machine."""
    if precision.fp8 is None:
        return
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    reason = fp8_refusal(precision, _te_version() if capability else None, capability)
    if reason is not None:
        raise ConfigError(reason)


def _te_version() -> Optional[tuple[int, int]]:
    try:
        import transformer_engine
    except (ImportError, OSError):  # OSError: its CUDA libraries are missing
        return None
    major, minor = transformer_engine.__version__.split(".")[:2]
    return int(major), int(minor)
