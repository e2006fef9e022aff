"""Model wrapping, optimizer and LR schedule, all megatron-core's own.

The model is wrapped in megatron-core's `DistributedDataParallel` (contiguous fp32 grad
buffers, DP all-reduce), the optimizer comes from `get_megatron_optimizer` (fp32 main
params for bf16/fp16, fp16 loss scaling, grad clipping, optional distributed optimizer;
megamod.precision picks its settings) and the schedule is
`OptimizerParamScheduler` (linear warmup, then cosine/linear decay to min_lr).

The loop runs megatron-core's optimizer step in its two halves (`prepare_grads`, then
`apply_update`), so the stability guard can see the gradient norm before any update.
"""

from __future__ import annotations

import math

import torch

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import (
    MegatronOptimizer,
    OptimizerConfig,
    clip_grads,
    get_megatron_optimizer,
)
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megamod.config import Config
from megamod.models.llava import LLaVA
from megamod.precision import optimizer_fields


def wrap_model(config: Config, model: LLaVA) -> DistributedDataParallel:
    """Megatron-LM's `get_model` order: onto this rank's GPU, into bf16/fp16 (`Float16Module`
    casts the whole model, plain torch parts included, and the float inputs), then DDP.
    `megatron.core.utils.unwrap_model` gives the LLaVA back."""
    module: torch.nn.Module = model  # wholly on its device already (`build_model`)
    if config.precision.params_dtype != "fp32":
        module = Float16Module(model.config, module)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer,
        # "skip" looks at the gradients itself (megamod.training.stability) after the
        # reduction; upstream's check raises inside it. Not in fp16, where a non-finite
        # gradient is an overflow that the loss scale answers.
        check_for_nan_in_grad=config.stability.on_nonfinite == "stop"
        and config.precision.params_dtype != "fp16",
    )
    return DistributedDataParallel(model.config, ddp_config, module)


def build_optimizer(config: Config, model: DistributedDataParallel) -> MegatronOptimizer:
    train = config.train
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=train.adam_eps,
        clip_grad=train.clip_grad,
        **optimizer_fields(config.precision),
        use_distributed_optimizer=config.parallel.use_distributed_optimizer,
    )
    return get_megatron_optimizer(optimizer_config, [model])


def apply_update(optimizer: MegatronOptimizer, grad_norm: float) -> None:
    """The second half of megatron-core's `ChainedOptimizer.step()` (optimizer.py ~line
    1308), for gradients that `prepare_grads()` made ready and whose total norm
    `get_grad_norm()` measured: clip each chained optimizer's main gradients by that norm,
    then update (`step_with_ready_grads`: Adam on the fp32 main params, copied back into
    bf16/fp16 params). Together with the first half it is exactly upstream's step."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = sub.get_parameters()
        if params and sub.config.clip_grad > 0.0:
            clip_grads.clip_grad_by_total_norm_fp32(  # module attribute: cpu_compat's on CPU
                params,
                max_norm=sub.config.clip_grad,
                total_norm=grad_norm,
                use_decoupled_grad=sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    updated = optimizer.step_with_ready_grads()
    assert updated, "megatron-core's update reported a failure"


def build_scheduler(config: Config, optimizer: MegatronOptimizer) -> OptimizerParamScheduler:
    train = config.train
    # megatron-core needs at least one step after warm-up (a 1-step run has none).
    warmup = min(math.ceil(train.lr_warmup_fraction * train.train_iters), train.train_iters - 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=train.train_iters,
        lr_decay_style=train.lr_decay_style,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=train.train_iters,
        wd_incr_style="constant",
    )
