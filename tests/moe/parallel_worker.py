"""Runs under torchrun for the MoE parallelism tests; writes tensors for pytest to compare.

  parallel_worker.py init OUT_DIR VARIANT... (1 process) a checkpoint of the initial
                                             weights, then the reference loss + gradients
  parallel_worker.py grads OUT_DIR VARIANT...(2 processes) the same step at EP=2 (DP=2),
                                             EP=2 with TP=2+SP, TP=2+SP with EP=1

Every layout loads the reference's initial weights (expert weights are initialised per
EP rank, so a fresh EP=2 model differs from EP=1), which also exercises resharding of
the experts across EP sizes. Gradients are stored under global names: TP shards gathered,
`local_experts.<i>` renamed to the global expert index.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.utils import unwrap_model

from megamod.parallel import collective_device
from megamod.training import checkpoint
from megamod.training.loop import forward_backward, setup
from tests.training.parallel_worker import gather_tp, start

MOE = ["moe.num_experts=4", "moe.router_topk=2", "moe.layer_freq=2", "moe.aux_loss_coeff=0.1",
       "moe.z_loss_coeff=0.01"]
VARIANTS = {"dropless": [], "capacity": ["moe.capacity_factor=1.0"],
            "deepspeed": ["moe.gate=deepspeed_top2", "moe.capacity_factor=1.0"]}
# (name, overrides); capacity is computed per rank's tokens, so under SP (half the
# sequence per rank) it drops other tokens than TP=1 does: compared at TP=1 only. The
# DeepSpeed gate counts capacity over the whole micro-batch at any TP, but every DP rank
# draws the same Gumbel noise stream (so DP=2 differs from one process), and with tokens
# dropped the experts' TP all-gather has uneven sizes, which gloo refuses: compared at
# TP=2 + SP with ETP=1 only.
LAYOUTS = {
    "ep2": ["parallel.expert_model_parallel_size=2"],
    "tp2_sp_ep2": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                   "parallel.expert_model_parallel_size=2", "parallel.expert_tensor_parallel_size=1"],
    "tp2_sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
}


def global_name(name: str, num_local_experts: int) -> str:
    """`...experts.local_experts.<i>...` -> the global expert index on this EP rank."""
    match = re.search(r"local_experts\.(\d+)\.", name)
    offset = parallel_state.get_expert_model_parallel_rank() * num_local_experts
    return name.replace(match.group(0), f"local_experts.{offset + int(match.group(1))}.")


def global_layer_name(name: str, offset: int) -> str:
    """A decoder layer's parameter under its global layer number (this pipeline stage's
    layers start at `offset`)."""
    return re.sub(r"^language_model\.decoder\.layers\.(\d+)\.",
                  lambda m: f"language_model.decoder.layers.{offset + int(m[1])}.", name)


def gradients(config, model) -> dict:
    """{"grads": every trained parameter's gradient, whole (TP shards gathered, experts
    from every EP rank under their global index, decoder layers from every pipeline stage
    under their global number), "disagreeing": the names of replicas (one tensor on several
    ranks) whose gradients differ between ranks}, on every rank."""
    num_local = (config.moe.num_experts or 0) // config.parallel.expert_model_parallel_size
    offset = get_transformer_layer_offset(model.language_model.config)
    grads = {}
    for param_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = global_layer_name(param_name, offset)
        if getattr(param, "allreduce", True):  # dense: TP-sharded at most
            grads[name] = gather_tp(param.main_grad, param)
        else:  # an expert: on its EP rank, sharded over the expert-TP group
            expert_tp = parallel_state.get_expert_tensor_parallel_group()
            grads[global_name(name, num_local)] = gather_tp(param.main_grad, param, expert_tp)
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, grads)
    merged, disagreeing = {}, set()
    for rank_grads in gathered:
        for name, grad in rank_grads.items():
            if name in merged and not torch.allclose(merged[name], grad, atol=1e-7, rtol=1e-5):
                disagreeing.add(name)
            merged.setdefault(name, grad)
    return {"grads": merged, "disagreeing": sorted(disagreeing)}


def step_grads(config, init_dir: Path | None) -> dict:
    state = setup(config)
    model = unwrap_model(state.model)
    if init_dir is not None:
        checkpoint.load_model_weights(init_dir, model)
    totals = forward_backward(state, state.loader.next_step())
    stats = model.routing_stats
    stats.all_reduce(parallel_state.get_tensor_and_data_parallel_group(), collective_device())  # as the loop does
    return {"loss": (totals[0] / totals[1]).item(), "tokens": totals[1].item(),
            "dropped": float(stats.dropped_fraction().mean()),
            **gradients(config, model), "model": model, "state": state}


def main(mode: str, out: Path, variant: str) -> None:
    extra = MOE + VARIANTS[variant]
    if mode == "init":
        config = start(1, False, extra)
        result = step_grads(config, None)
        # The initial weights (the step above changed only grads) for the other layouts.
        result.pop("state")
        checkpoint.save_checkpoint(out / f"init_{variant}", 0, result.pop("model"), None, None,
                                   {}, config)
        torch.save(result, out / f"grads_{variant}_ref.pt")
        return
    for layout, overrides in LAYOUTS.items():
        if variant == "capacity" and "sequence_parallel=true" in " ".join(overrides):
            continue
        if variant == "deepspeed" and layout != "tp2_sp_ep2":
            continue
        config = start(1, False, extra + overrides)  # later overrides win
        result = step_grads(config, out / f"init_{variant}")
        result.pop("state"), result.pop("model")
        if torch.distributed.get_rank() == 0:
            torch.save(result, out / f"grads_{variant}_{layout}.pt")


if __name__ == "__main__":
    for name in sys.argv[3:]:  # one launch runs every variant (a launch costs ~10 s of imports)
        main(sys.argv[1], Path(sys.argv[2]), name)
    torch.distributed.barrier()
