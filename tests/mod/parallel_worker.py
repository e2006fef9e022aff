"""Runs under torchrun for the MoD parallelism tests; writes tensors for pytest to compare.

  parallel_worker.py init OUT_DIR VARIANT... (1 process) random MoD routers (distinct
                                             weights, so the selection is not a tie),
                                             saved as the initial weights; then the
                                             reference loss + gradients at TP=1
  parallel_worker.py grads OUT_DIR VARIANT...(2 processes) the same step at TP=2 + SP
                                             (VARIANT mod_moe: and EP=2)

Every process builds the same two micro-batches from the tiny data set, mixing text-only,
one-image and two-image samples (MoD + MoE: packed rows of the tiny stream), so every rank
sees all of them (DP=1 everywhere).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from megatron.core.utils import unwrap_model

from megamod.training import checkpoint
from megamod.training.loop import forward_backward, setup
from tests.moe.parallel_worker import MOE, gradients
from tests.training.parallel_worker import start

# A 96-token sequence: under SP each rank holds 48 positions, and the vision tokens (from
# position 32; 33 of them in a two-image sample) fall on both ranks.
MOD = ["mod.enabled=true", "train.micro_batch_size=1", "train.global_batch_size=1",
       "model.language.seq_length=96", "data.max_skip_fraction=0.5", "data.padding=max_length"]
# Dense MoD pads the kept tokens only to an even length; with MoE to the default 64, here
# 128 slots for at most 96 kept tokens (padding slots past the sequence's end). MoD + MoE
# runs on packed rows: two steps of two rows, samples whole, each row ending in padding.
VARIANTS = {"mod": ["mod.kept_length_multiple=2"],
            "mod_moe": MOE + ["data.packing=true", "train.micro_batch_size=2", "train.global_batch_size=2",
                              "model.language.seq_length=192"]}
LAYOUTS = {
    "mod": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    "mod_moe": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                "parallel.expert_model_parallel_size=2", "parallel.expert_tensor_parallel_size=1"],
}
PATCHES = 16  # the tiny config's image tokens per image


def mixed_micro_batches(loader, image_token_id: int) -> list[dict]:
    """Two micro-batches of 3 samples: [0, 1, 2 images] and [1, 2, 0 images]."""
    by_images: dict[int, list[dict]] = {0: [], 1: [], 2: []}
    while any(len(samples) < 2 for samples in by_images.values()):
        (sample,) = loader.next_step()  # micro and global batch size 1
        images = int((sample["tokens"] == image_token_id).sum()) // PATCHES
        if images in by_images:
            by_images[images].append(sample)
    first = [by_images[0][0], by_images[1][0], by_images[2][0]]
    second = [by_images[1][1], by_images[2][1], by_images[0][1]]
    return [_stack(group) for group in (first, second)]


def _stack(samples: list[dict]) -> dict:
    """One micro-batch of single-sample batches, each padded to the widest (`data.padding`
    `longest` cuts each to its own length)."""
    width = max(s["tokens"].shape[1] for s in samples)
    fill = {"tokens": 0, "labels": -100, "loss_mask": False, "padding_mask": True}
    batch = {key: torch.cat([torch.nn.functional.pad(s[key], (0, width - s[key].shape[1]), value=fill[key])
                             for s in samples]) for key in fill}
    batch["images"] = torch.cat([s["images"] for s in samples])
    return batch


def step(config, init_dir: Path | None):
    state = setup(config)
    model = unwrap_model(state.model)
    if init_dir is None:  # distinct router weights: a real selection, no ties
        generator = torch.Generator().manual_seed(5)
        for layer in model.mod_layers():
            for param in layer.mod_router.parameters():
                param.data.normal_(0.0, 0.3, generator=generator)
    else:
        checkpoint.load_model_weights(init_dir, model)
    if config.data.packing:
        batches = state.loader.next_step() + state.loader.next_step()
        assert all((b["segment_ids"].max(1).values >= 1).any() for b in batches), "rows of one sample"
    else:
        batches = mixed_micro_batches(state.loader, model.image_token_id)
    totals = forward_backward(state, batches)
    result = {"loss": (totals[0] / totals[1]).item(), "tokens": totals[1].item(),
              **gradients(config, model)}
    model.mod_stats.gather_pipeline_stages()  # every stage's layers (pipeline parallelism)
    result["kept"] = model.mod_stats.scalars()
    return result, model


def main(mode: str, out: Path, variant: str) -> None:
    extra = MOD + VARIANTS[variant]
    if mode == "init":
        config = start(1, False, extra)
        result, model = step(config, None)
        checkpoint.save_checkpoint(out / f"init_{variant}", 0, model, None, None, {}, config)
        torch.save(result, out / f"grads_{variant}_ref.pt")
        return
    config = start(1, False, extra + LAYOUTS[variant])  # later overrides win
    result, _ = step(config, out / f"init_{variant}")
    if torch.distributed.get_rank() == 0:
        torch.save(result, out / f"grads_{variant}_tp2.pt")


if __name__ == "__main__":
    for name in sys.argv[3:]:  # one launch runs every variant (a launch costs ~10 s of imports)
        main(sys.argv[1], Path(sys.argv[2]), name)
    torch.distributed.barrier()
