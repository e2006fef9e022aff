"""Runs under torchrun for the pipeline-parallelism tests; writes tensors for pytest to compare.

  pipeline_worker.py init OUT_DIR    (1 process) per variant: initial weights saved, then
                                     the reference loss + gradients of one step (PP=1)
  pipeline_worker.py grads OUT_DIR   (4 processes) per variant, the same step from those
                                     weights at PP=2 with DP=2 (and EP=2 for MoE), and at
                                     TP=2 + SP x PP=2 (and EP=2 for MoE)

Variants: dense (untied, and tied embeddings), MoE (aux + z loss: the routers' gradients carry them from both stages),
MoD (PRD; micro-batches mixing text-only, one- and two-image samples) and MoD + MoE on
packed rows. The MoD micro-batches are built alike on every rank, so MoD runs at DP=1 only.
Gradients are stored under global names (decoder layers by global number, experts by
global index, TP shards gathered), merged from every stage.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from megatron.core.utils import unwrap_model

from megamod.training import checkpoint
from megamod.training.loop import forward_backward, setup
from tests.mod import parallel_worker as mod_worker
from tests.moe.parallel_worker import MOE, gradients
from tests.training.parallel_worker import start

PP2 = ["parallel.pipeline_model_parallel_size=2"]
TP2_SP = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]
EP2 = ["parallel.expert_model_parallel_size=2", "parallel.expert_tensor_parallel_size=1"]
VARIANTS = {
    "dense": [],
    # The output layer shares the embedding's weight: at PP=2 the last stage holds a copy,
    # its gradient all-reduced with the first stage's (megatron-core's embedding group).
    "tied": ["model.language.untie_embeddings_and_output_weights=false"],
    "moe": MOE,
    "mod": mod_worker.MOD + mod_worker.VARIANTS["mod"],
    "mod_moe": mod_worker.MOD + mod_worker.VARIANTS["mod_moe"],
}
LAYOUTS = {
    "dense": {"pp2_dp2": PP2, "tp2_sp_pp2": TP2_SP + PP2},
    "tied": {"pp2_dp2": PP2},
    "moe": {"pp2_dp2_ep2": PP2 + EP2, "tp2_sp_pp2_ep2": TP2_SP + PP2 + EP2},
    "mod": {"tp2_sp_pp2": TP2_SP + PP2},
    "mod_moe": {"tp2_sp_pp2_ep2": TP2_SP + PP2 + EP2},
}


def step(variant: str, config, init_dir: Path | None) -> tuple[dict, torch.nn.Module]:
    if variant.startswith("mod"):
        return mod_worker.step(config, init_dir)
    state = setup(config)
    model = unwrap_model(state.model)
    if init_dir is not None:
        checkpoint.load_model_weights(init_dir, model)
    totals = forward_backward(state, state.loader.next_step())
    state.loader.close()
    return {"loss": (totals[0] / totals[1]).item(), "tokens": totals[1].item(),
            **gradients(config, model)}, model


def main(mode: str, out: Path) -> None:
    for variant, extra in VARIANTS.items():
        if mode == "init":
            config = start(1, False, extra)
            result, model = step(variant, config, None)
            checkpoint.save_checkpoint(out / f"init_{variant}", 0, model, None, None, {}, config)
            torch.save(result, out / f"grads_{variant}_ref.pt")
            continue
        for layout, overrides in LAYOUTS[variant].items():
            config = start(1, False, extra + overrides)  # later overrides win
            result, _ = step(variant, config, out / f"init_{variant}")
            if torch.distributed.get_rank() == 0:
                torch.save(result, out / f"grads_{variant}_{layout}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    torch.distributed.barrier()
