"""Evaluation during training (`eval.interval`): the held-out loss is the model's loss on
the held-out steps, computed independently here, and training is untouched by it: the same
losses step for step with evaluations in between, with MoE-LLaVA's gate, which draws Gumbel
noise at evaluation too (a forgotten random stream would change the next training step)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from megamod.config import load_config
from tests.launcher import TINY_CONFIG, world_of_one

BASE = ["checkpoint.save_dir=null", "checkpoint.save_interval=null", "logging.tensorboard_dir=null",
        "moe.num_experts=4", "moe.router_topk=2", "moe.layer_freq=2", "moe.gate=deepspeed_top2",
        "moe.capacity_factor=1.0", "data.prefetch_steps=0"]
EVAL = ["eval.interval=1", "eval.shards=[tiny, tiny]", "eval.iters=2"]


@pytest.fixture(scope="module")
def world():
    with world_of_one(BASE):
        yield


def fresh_state(overrides: list[str]):
    from megamod.parallel import seed_everything
    from megamod.training.loop import setup

    config = load_config(TINY_CONFIG, BASE + overrides)
    seed_everything(config.train.seed)
    return setup(config)


def test_training_steps_are_the_same_with_evaluations_between_them(tmp_path):
    """The same 3-step run twice, as separate processes: without evaluation, and with one
    after every step (two held-out sources, two steps each)."""
    from tests.launcher import check, run
    from tests.training.test_checkpoint import step_losses

    def train(extra: list[str]) -> str:
        return check(run([sys.executable, "-m", "megamod", "train", str(TINY_CONFIG), *BASE,
                          "train.train_iters=3", "logging.log_interval=1", *extra], cwd=tmp_path)).stdout

    plain, evaluated = train([]), train(EVAL)
    assert step_losses(evaluated) == step_losses(plain) and len(step_losses(plain)) == 3
    records = [json.loads(line) for line in evaluated.splitlines() if '"eval/loss"' in line]
    assert len(records) == 3 and all(r["eval/loss"] > 0 and "eval/loss/1" in r for r in records)
    # Each evaluation reads the same held-out steps: what moves is the model.
    assert records[0]["eval/loss"] != records[2]["eval/loss"]


def test_the_held_out_loss_is_the_models_loss_on_the_held_out_steps(world):
    from megatron.core.utils import unwrap_model

    from megamod.data.loader import build_eval_loaders
    from megamod.data.tokenizer import load_tokenizer

    state = fresh_state(["moe.gate=megatron", "eval.interval=1", "eval.shards=[tiny]", "eval.iters=2"])
    llava = unwrap_model(state.model)
    llava.routing_stats.reset()
    scalars = state.validator.evaluate(state.model)
    assert llava.routing_stats.tokens.sum() == 0  # the training statistics were put back
    (loader,) = build_eval_loaders(state.config, load_tokenizer("tiny"), 0, 1)
    loss_sum = loss_tokens = 0.0
    llava.eval()
    with loader, torch.no_grad():
        for _ in range(2):
            for batch in loader.next_step():
                losses = llava(batch["tokens"], batch["images"], batch["labels"], batch["loss_mask"],
                               padding_mask=batch["padding_mask"])
                loss_sum += float((losses * batch["loss_mask"]).sum())
                loss_tokens += float(batch["loss_mask"].sum())
    llava.train()
    assert scalars["eval/loss"] == pytest.approx(loss_sum / loss_tokens, rel=1e-6)
    state.loader.close()
    state.validator.close()
