"""Runs under torchrun for the parallelism tests; writes tensors for pytest to compare.

  parallel_worker.py grads OUT_DIR          loss and full (TP-gathered) gradients of one
                                            step, for each layout this world size allows
  parallel_worker.py logits OUT_DIR CKPT    logits of a fixed batch after loading CKPT:
                                            its model weights at TP=world size, then all
                                            of it (optimizer too) at TP=1
  parallel_worker.py agreement OUT_DIR      (2 processes, TP=2) the TP ranks' batches
                                            made one: images another decoder produced on
                                            one rank replaced, differing tokens refused
  parallel_worker.py precision OUT_DIR      a few training steps (a NaN injected into one
                                            step) in fp32, bf16 and fp16 at TP=1, and bf16
                                            at TP=2 + SP: per-step metrics and the first
                                            step's gradients

One process group per launch; megatron-core's parallel state is rebuilt per layout.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model

from megamod.config import load_config
from megamod.parallel import init_distributed
from megamod.training import checkpoint
from megamod.training.loop import forward_backward, setup, train_step

REPO = Path(__file__).resolve().parents[2]
BASE_OVERRIDES = ["train.micro_batch_size=1", "train.global_batch_size=4", "checkpoint.save_dir=null", "checkpoint.save_interval=null",
                  "logging.tensorboard_dir=null"]


def layouts(world_size: int) -> list[tuple[int, bool]]:
    """(TP, SP) pairs to run; DP = world_size / TP."""
    return [(1, False)] if world_size == 1 else [(2, True), (1, False)]


def start(tp: int, sp: bool, extra: list[str] = ()):
    config = load_config(
        REPO / "examples/configs/tiny.yaml",
        BASE_OVERRIDES
        + [f"parallel.tensor_model_parallel_size={tp}", f"parallel.sequence_parallel={sp}"]
        + list(extra),
    )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    init_distributed(config.parallel, config.train.seed)
    return config


def gather_tp(tensor: torch.Tensor, param: torch.nn.Parameter, group=None) -> torch.Tensor:
    """The full tensor of a TP-sharded parameter (or its grad), strides respected; `group`:
    the group it is sharded over (default the TP group; experts: the expert-TP group)."""
    if not getattr(param, "tensor_model_parallel", False):
        return tensor
    group = group or parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(tensor) for _ in range(group.size())]
    torch.distributed.all_gather(shards, tensor.contiguous(), group=group)
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    # A rank's shard holds `stride` chunks (e.g. SwiGLU's gate and up rows): interleave.
    chunks = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([c[s] for s in range(stride) for c in chunks], dim=dim)


def grads(out_dir: Path) -> None:
    world = int(os.environ["WORLD_SIZE"])
    for tp, sp in layouts(world):
        config = start(tp, sp)
        state = setup(config)
        totals = forward_backward(state, state.loader.next_step())
        result = {"loss": (totals[0] / totals[1]).item(), "tokens": totals[1].item(), "grads": {}}
        for name, param in unwrap_model(state.model).named_parameters():
            if param.requires_grad:
                result["grads"][name] = gather_tp(param.main_grad, param)
        state.loader.close()
        if torch.distributed.get_rank() == 0:
            dp = world // tp
            torch.save(result, out_dir / f"grads_tp{tp}_sp{int(sp)}_dp{dp}.pt")


def logits(out_dir: Path, ckpt_dir: Path) -> None:
    world = int(os.environ["WORLD_SIZE"])
    for tp in sorted({world, 1}, reverse=True):
        config = start(tp, tp > 1)
        state = setup(config)
        model = unwrap_model(state.model)
        if tp == 1:  # a full resume (optimizer, schedule, data) across the TP change
            checkpoint.load_checkpoint(ckpt_dir, model, state.optimizer, state.scheduler)
        else:
            checkpoint.load_model_weights(ckpt_dir, model)
        batch = state.loader.next_step()[0]
        model.eval()
        with torch.no_grad():
            shard = model(batch["tokens"], batch["images"])  # [b, s, v / TP]
        group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(shard) for _ in range(group.size())]
        torch.distributed.all_gather(parts, shard.contiguous(), group=group)
        if torch.distributed.get_rank() == 0:
            torch.save(torch.cat(parts, dim=-1), out_dir / f"logits_tp{tp}.pt")


PRECISION_STEPS, PRECISION_NAN_AT = 8, 4
# fp16 with a loss scale that does not overflow on this model, halved at the first overflow.
FP16 = ["precision.initial_loss_scale=1024", "precision.hysteresis=1"]


def precision(out_dir: Path) -> None:
    runs = {"fp32_tp1": ("fp32", 1), "bf16_tp1": ("bf16", 1), "fp16_tp1": ("fp16", 1),
            "bf16_tp2": ("bf16", 2)}
    for name, (dtype, tp) in runs.items():
        extra = [f"precision.params_dtype={dtype}", f"stability.inject_nan_at={PRECISION_NAN_AT}"]
        config = start(tp, tp > 1, extra + (FP16 if dtype == "fp16" else []))
        state = setup(config)
        model = unwrap_model(state.model)
        result = {"steps": [], "grads": {}}
        for _ in range(PRECISION_STEPS):
            batches = state.loader.next_step()
            if state.iteration == 0:  # the first step's gradients, before any update
                state.model.zero_grad_buffer()
                forward_backward(state, batches)
                result["grads"] = {
                    n: gather_tp(p.main_grad, p).clone()
                    for n, p in model.named_parameters() if p.requires_grad
                }
            metrics = train_step(state, batches)
            state.iteration += 1
            result["steps"].append({**metrics, **state.guard.scalars()})
        result["param_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
        result["main_param_dtypes"] = sorted(
            {str(p.dtype) for g in state.optimizer.param_groups for p in g["params"]}
        )
        state.loader.close()
        if torch.distributed.get_rank() == 0:
            torch.save(result, out_dir / f"precision_{name}.pt")


def agreement(out_dir: Path) -> None:
    from megamod.data.loader import step_fingerprint
    from megamod.data.tokenizer import load_tokenizer
    from megamod.errors import DataError
    from megamod.training.forward import agree_within_tensor_parallel_group, next_step_agreed
    from megamod.training.loop import build_loader

    config = start(2, True)
    loader = build_loader(config, load_tokenizer(config.data.tokenizer))
    rank = parallel_state.get_tensor_model_parallel_rank()
    warnings: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warnings.append
    logging.getLogger("megamod").addHandler(handler)
    result = {}
    # The same step, decoded alike: its fingerprint, taken in the loader's thread, is the
    # batches'; nothing is replaced (no warning).
    batches = next_step_agreed(loader)
    result["fingerprint_is_the_batches"] = loader.last_fingerprint == step_fingerprint(batches)
    result["warned_when_alike"] = len(warnings)
    # Rank 1 decoded the images with another interpolation (DALI's Pillow fallback).
    batches = loader.next_step()
    if rank == 1:
        for b in batches:
            b["images"] += 1e-3
    result["decoded"] = [b["images"].clone() for b in batches]
    agreed = agree_within_tensor_parallel_group(batches, step_fingerprint(batches))
    result["images"] = [b["images"] for b in agreed]
    result["warned_when_different"] = len(warnings)
    # Rank 1 read one token differently (a sample it could not read, replaced).
    batches = loader.next_step()
    if rank == 1:
        batches[0]["tokens"][0, -1] += 1
    try:
        agree_within_tensor_parallel_group(batches, step_fingerprint(batches))
        result["refused"] = None
    except DataError as e:
        result["refused"] = str(e)
    loader.close()
    torch.save(result, out_dir / f"agreement_rank{rank}.pt")


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "grads":
        grads(out)
    elif mode == "precision":
        precision(out)
    elif mode == "agreement":
        agreement(out)
    else:
        logits(out, Path(sys.argv[3]))
    torch.distributed.barrier()
