"""Numeric precision choices that depend on the machine (FP8 will join here)."""

from __future__ import annotations

import torch

from megamod.config import Config
from megamod.errors import ConfigError


def check_precision_supported(config: Config) -> None:
    """bf16/fp16 training uses megatron-core's mixed-precision optimizer, which is
    CUDA-only (it checks for `torch.cuda.*Tensor` params): refuse it on CPU up front."""
    dtype = config.precision.params_dtype
    if dtype != "fp32" and not torch.cuda.is_available():
        raise ConfigError(
            f"precision.params_dtype={dtype} needs a GPU (megatron-core's mixed-precision "
            f"optimizer is CUDA-only): use precision.params_dtype=fp32 on CPU"
        )
