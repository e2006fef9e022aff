"""Freezing per training stage: frozen parts get no gradients and no optimizer state.

Runs in this process as a world of one (gloo), through the real setup() and train_step().
"""

from __future__ import annotations


import pytest
import torch

from megamod.config import load_config
from megamod.errors import ConfigError
from tests.launcher import TINY_CONFIG, world_of_one

STAGE1 = ["train.trainable=[projector]", "checkpoint.save_dir=null",
          "checkpoint.save_interval=null", "logging.tensorboard_dir=null",
          "train.global_batch_size=4", "train.micro_batch_size=2",
          "train.lr_warmup_fraction=0"]  # warmup's first step has lr 0


@pytest.fixture(scope="module")
def stage1_world():
    with world_of_one(STAGE1) as config:
        yield config


def test_stage1_trains_only_the_projector(stage1_world):
    from megatron.core.utils import unwrap_model

    from megamod.training.loop import setup, train_step

    state = setup(stage1_world)
    llava = unwrap_model(state.model)
    trainable = {id(p) for p in llava.vision_projection.parameters()}
    optimized = [p for group in state.optimizer.param_groups for p in group["params"]]
    assert optimized and {id(p) for p in optimized} == trainable

    before = {name: p.detach().clone() for name, p in llava.named_parameters()}
    train_step(state, state.loader.next_step())
    changed = {name for name, p in llava.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {n for n, _ in llava.named_parameters() if n.startswith("vision_projection.")}
    assert all(not p.requires_grad for p in llava.vision_model.parameters())
    assert all(not p.requires_grad for p in llava.language_model.parameters())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's refusals")
@pytest.mark.parametrize("override", ["precision.fp8=hybrid"])
def test_gpu_only_features_are_refused_on_cpu_with_the_key(stage1_world, override):
    from megamod.training.loop import setup

    config = load_config(TINY_CONFIG, STAGE1 + [override])
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        setup(config)
