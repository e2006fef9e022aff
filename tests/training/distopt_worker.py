"""Runs under torchrun for tests/training/test_distributed_optimizer.py; writes per-rank
parameters and Adam state for pytest to compare.

  distopt_worker.py dp2 OUT     (2 processes) STEPS steps with the plain and the
                                distributed optimizer at DP=2, fp32 and bf16; the
                                distributed runs save OUT/ckpt_{fp32,bf16}_dist_dp2
  distopt_worker.py dp1 OUT     (1 process) the plain optimizer resumes both; fp32 saves
                                it again as OUT/ckpt_fp32_plain_dp1
  distopt_worker.py four OUT    (4 processes) plain vs distributed at TP=2 + SP (DP=2) and
                                with MoE (EP=2, expert-DP=2, DP=4); the distributed
                                optimizer resumes both checkpoints at DP=4, and the
                                plain MoE run's

Each result holds, by parameter name, the rank's model parameter and its full (DP-gathered)
fp32 main parameter, exp_avg and exp_avg_sq, read from megatron-core's optimizer objects.
"""

from __future__ import annotations

import sys
from itertools import chain
from pathlib import Path

import torch
from megatron.core.optimizer import ChainedOptimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params
from megatron.core.utils import unwrap_model

from megamod.training import checkpoint
from megamod.training.loop import setup, train_step
from tests.training.parallel_worker import start

STEPS = 3
# No warm-up: every one of the few steps updates the weights.
COMMON = ["train.lr_warmup_fraction=0.0"]
MOE = ["moe.num_experts=4", "moe.layer_freq=2", "parallel.expert_model_parallel_size=2"]
ADAM = ("param", "exp_avg", "exp_avg_sq")


def _sub_optimizers(optimizer) -> list:
    return optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]


def _distributed_state(sub: DistributedOptimizer) -> dict[int, dict[str, torch.Tensor]]:
    """Each parameter's full main copy and moments: this rank's shard put in place, summed
    over the optimizer's DP group (every other rank contributes zeros there)."""
    result = {}
    for param in chain.from_iterable(buffer.params for buffer in sub.buffers):
        full = {key: torch.zeros(param.numel()) for key in ADAM}
        if param in sub.model_param_group_index_map:
            shard = sub._get_main_param_and_optimizer_states(param)
            span = sub._get_model_param_range_map(param)["param"]
            for key in ADAM:
                full[key][span.start:span.end] = shard[key]
        for key in ADAM:
            torch.distributed.all_reduce(full[key], group=sub.data_parallel_group)
        result[id(param)] = {key: value.view(param.shape) for key, value in full.items()}
    return result


def _plain_state(sub) -> dict[int, dict[str, torch.Tensor]]:
    if isinstance(sub, Float16OptimizerWithFloat16Params):
        pairs = zip(chain(*sub.float16_groups, *sub.fp32_from_fp32_groups),
                    chain(*sub.fp32_from_float16_groups, *sub.fp32_from_fp32_groups))
    else:  # FP32Optimizer: Adam updates the model parameters themselves
        pairs = ((p, p) for group in sub.optimizer.param_groups for p in group["params"])
    return {
        id(model_param): {"param": main.detach().clone(),
                          **{k: sub.optimizer.state[main][k].clone() for k in ADAM[1:]}}
        for model_param, main in pairs
    }


def snapshot(state) -> dict:
    model = unwrap_model(state.model)
    adam = {}
    for sub in _sub_optimizers(state.optimizer):
        adam.update(_distributed_state(sub) if isinstance(sub, DistributedOptimizer)
                    else _plain_state(sub))
    return {
        "params": {n: p.detach().float().clone() for n, p in model.named_parameters()},
        "adam": {n: adam[id(p)] for n, p in model.named_parameters() if p.requires_grad},
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "optimizers": [type(sub).__name__ for sub in _sub_optimizers(state.optimizer)],
        # Over how many ranks each distributed optimizer shards its state.
        "shards": [sub.data_parallel_group.size() for sub in _sub_optimizers(state.optimizer)
                   if isinstance(sub, DistributedOptimizer)],
    }


def train(tp: int, sp: bool, extra: list[str], save_dir: Path | None = None) -> dict:
    config = start(tp, sp, COMMON + extra)
    state = setup(config)
    losses, grad_norms = [], []
    for _ in range(STEPS):
        metrics = train_step(state, state.loader.next_step())
        state.iteration += 1
        losses.append(metrics["train/loss"])
        grad_norms.append(metrics["train/grad_norm"])
    if save_dir is not None:
        checkpoint.save_checkpoint(save_dir, state.iteration, unwrap_model(state.model),
                                   state.optimizer, state.scheduler,
                                   state.loader.state_dict(), config)
    state.loader.close()
    return {**snapshot(state), "losses": losses, "grad_norms": grad_norms}


def resume(tp: int, sp: bool, extra: list[str], load_dir: Path,
           save_dir: Path | None = None) -> dict:
    """The run's setup() resuming `load_dir` (`checkpoint.load`), as a user resumes."""
    config = start(tp, sp, COMMON + extra + [f"checkpoint.load={load_dir}"])
    state = setup(config)
    if save_dir is not None:
        checkpoint.save_checkpoint(save_dir, state.iteration, unwrap_model(state.model),
                                   state.optimizer, state.scheduler,
                                   state.loader.state_dict(), config)
    loaded = snapshot(state)
    # One more update: torch AdamW's per-parameter step counts move on by one each.
    train_step(state, state.loader.next_step())
    steps = {float(s["step"]) for sub in _sub_optimizers(state.optimizer)
             for s in sub.optimizer.state.values()}
    state.loader.close()
    return {**loaded, "iteration": state.iteration, "steps_after_an_update": sorted(steps)}


def main(mode: str, out: Path) -> None:
    results = {}
    dist = ["parallel.use_distributed_optimizer=true"]
    if mode == "dp2":
        # bf16 unclipped: the clipping coefficient comes from a norm summed in another
        # order (per DP shard, then all-reduced), and a last-bit change of a main param
        # can flip a bf16 rounding of its model param.
        for dtype, clip in (("fp32", 1.0), ("bf16", 0.0)):
            precision = [f"precision.params_dtype={dtype}", f"train.clip_grad={clip}"]
            results[f"{dtype}_plain"] = train(1, False, precision)
            results[f"{dtype}_dist"] = train(1, False, precision + dist,
                                             out / f"ckpt_{dtype}_dist_dp2")
    elif mode == "dp1":
        results["fp32_plain_from_dist"] = resume(1, False, [], out / "ckpt_fp32_dist_dp2",
                                                 out / "ckpt_fp32_plain_dp1")
        results["bf16_plain_from_dist"] = resume(1, False, ["precision.params_dtype=bf16"],
                                                 out / "ckpt_bf16_dist_dp2")
    else:
        results["tp2_plain"] = train(2, True, [])
        results["tp2_dist"] = train(2, True, dist)
        results["moe_plain"] = train(1, False, MOE, out / "ckpt_moe_plain")
        results["moe_dist"] = train(1, False, MOE + dist)
        results["moe_dist_from_plain"] = resume(1, False, MOE + dist, out / "ckpt_moe_plain")
        results["dist_dp4_from_dist_dp2"] = resume(1, False, dist, out / "ckpt_fp32_dist_dp2")
        results["dist_dp4_from_plain_dp1"] = resume(1, False, dist, out / "ckpt_fp32_plain_dp1")
    torch.save(results, out / f"{mode}_rank{torch.distributed.get_rank()}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    torch.distributed.barrier()
