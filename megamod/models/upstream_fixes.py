"""Fixes to megatron-core 0.16.1 bugs that hit every machine, GPU or CPU, applied by
`megamod.models.build.build_model` before it builds a model. CPU-only patches live in
`megamod.cpu_compat` (applied only without CUDA); these are for upstream code that is
wrong whatever the device. Each names the upstream spot it answers.
"""

from __future__ import annotations


def _define_te_general_gemm() -> None:
    """transformer/moe/moe_utils.py imports `te_general_gemm` only when transformer-engine
    imports (with the fused MoE kernels), yet `RouterGatingLinearFunction` (the router's
    gating GEMM under `moe_router_dtype`) tests `te_general_gemm is not None`: a NameError
    in every MoE forward without TE, on a GPU as on a CPU. Define it as None, the value
    extensions/transformer_engine.py itself gives it when TE's GEMM is unavailable."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def apply() -> None:
    """Apply every fix (idempotent)."""
    _define_te_general_gemm()
