"""Fixes to megatron-core 0.16.1 bugs that hit every machine, GPU or CPU, applied by
`megamod.models.build.build_model` before it builds a model. CPU-only patches live in
`megamod.cpu_compat` (applied only without CUDA); these are for upstream code that is
wrong whatever the device. Each names the upstream spot it answers.
"""

from __future__ import annotations

import torch


def _define_te_general_gemm() -> None:
    """transformer/moe/moe_utils.py imports `te_general_gemm` only when transformer-engine
    imports (with the fused MoE kernels), yet `RouterGatingLinearFunction` (the router's
    gating GEMM under `moe_router_dtype`) tests `te_general_gemm is not None`: a NameError
    in every MoE forward without TE, on a GPU as on a CPU. Define it as None, the value
    extensions/transformer_engine.py itself gives it when TE's GEMM is unavailable."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _own_adam_step_per_parameter() -> None:
    """optimizer/distrib_optimizer.py `DistributedOptimizer.load_state_dict` (~line 823),
    without apex or transformer-engine (torch's AdamW: on a CPU, or a GPU without TE), puts
    one and the same `step` tensor into every parameter's state, and torch's AdamW
    increments each parameter's step in place: after a resume the shared count advances
    once per parameter per update, so Adam's bias correction is wrong from the first step
    on. Each parameter gets its own copy of the loaded count."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if getattr(DistributedOptimizer.load_state_dict, "_megamod_own_step", False):
        return
    original = DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        original(self, state_dict)
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()

    load_state_dict._megamod_own_step = True
    DistributedOptimizer.load_state_dict = load_state_dict


def apply() -> None:
    """Apply every fix (idempotent)."""
    _define_te_general_gemm()
    _own_adam_step_per_parameter()
