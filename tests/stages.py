"""Recipe stages as a user runs them, in bf16, and the checks every stage change shares:
a stage's first loss is the loaded model's (evaluated apart from the training loop), and
its first step moves each trained weight by at most the learning rate.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tests.launcher import check, free_port, run

MODEL_PREFIXES = ("vision_model.", "vision_projection.", "language_model.")


def overrides(save_dir: Path, *extra: str) -> list[str]:
    return ["train.train_iters=2", "checkpoint.save_interval=1", "precision.params_dtype=bf16",
            "train.lr_warmup_fraction=0",  # warm-up would give step 1 a zero LR
            f"checkpoint.save_dir={save_dir}", "logging.tensorboard_dir=null", *extra]


def train(config: Path, root: Path, stage: str, *extra: str) -> Path:
    """`megamod train config` for 2 steps in bf16, saving after each; its stdout is kept."""
    save_dir = root / stage
    result = check(run([sys.executable, "-m", "megamod", "train", str(config),
                        *overrides(save_dir, *extra)],
                       cwd=root, extra_env={"MASTER_PORT": str(free_port())}))
    (root / f"{stage}.log").write_text(result.stdout)
    return save_dir


def first_loss(root: Path, stage: str) -> float:
    records = [json.loads(line) for line in (root / f"{stage}.log").read_text().splitlines()
               if line.startswith("{")]
    return next(r["train/loss"] for r in records if r.get("iteration") == 1)


def plain_tensor_reader():
    """Yields read(save_dir, iteration, prefix=""): the model tensors of `save_dir/iter_N`
    (a gloo world of one reads them), keyed without `prefix`."""
    from megatron.core import dist_checkpointing

    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )

    def read(save_dir: Path, iteration: int, prefix: str = "") -> dict[str, torch.Tensor]:
        tensors = dist_checkpointing.load_plain_tensors(str(save_dir / f"iter_{iteration:07d}"))
        return {k[len(prefix):]: v for k, v in tensors.items()
                if k.startswith(tuple(prefix + p for p in MODEL_PREFIXES))}

    yield read
    torch.distributed.destroy_process_group()


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """Keys whose tensors differ (upcycle writes fp32 copies of bf16 weights: compared in
    the later tensor's dtype, which holds them exactly)."""
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k].to(after[k].dtype), after[k])}


def loaded_model_loss(config: Path, save_dir: Path, load_dir: Path) -> float:
    """The model of `config` holding `load_dir`'s latest weights, in bf16 and eval mode,
    on the first global batch the stage trains on: mean loss over its loss tokens. Runs in
    the world of one `plain_tensor_reader` holds."""
    from megatron.core import parallel_state, tensor_parallel

    from megamod import cpu_compat
    from megamod.config import load_config
    from megamod.data.loader import build_train_loader, prepare_tiny_shards
    from megamod.data.tokenizer import load_tokenizer
    from megamod.models.build import build_model
    from megamod.training.checkpoint import load_model_weights

    stage = load_config(config, overrides(save_dir, f"checkpoint.load={load_dir}"))
    tokenizer = load_tokenizer(stage.data.tokenizer)
    cpu_compat.apply()
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(stage.train.seed)
    try:
        model = build_model(stage, tokenizer)
        load_model_weights(load_dir, model)
        model = model.to(torch.bfloat16).eval()
        prepare_tiny_shards()
        total, tokens = 0.0, 0.0
        with build_train_loader(stage, tokenizer, 0, 1) as loader, torch.no_grad():
            for batch in loader.next_step():
                losses = model(batch["tokens"], batch["images"].to(torch.bfloat16),
                               batch["labels"], batch["loss_mask"])
                mask = batch["loss_mask"].float()
                total += float((losses.float() * mask).sum())
                tokens += float(mask.sum())
    finally:
        parallel_state.destroy_model_parallel()
    return total / tokens


def largest_move_beyond_lr(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
                           lr: float) -> float:
    """How far the weights that changed moved beyond Adam's first-step bound: lr (m/sqrt(v)
    = g/|g|; no weight decay) plus bf16's rounding of the result. <= 0 within the bound."""
    worst = float("-inf")
    for key in changed(before, after):
        start, end = before[key].float(), after[key].float()
        worst = max(worst, float(((end - start).abs() - (lr + 2.0**-8 * end.abs())).max()))
    return worst
