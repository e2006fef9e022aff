"""checkpoint.finetune in bf16 and fp16: the loaded weights are what trains.

With 16-bit parameters megatron-core's optimizer steps fp32 main copies and writes them
back; copies taken before the weights were loaded would put the initialisation back at
the first step. After one step at learning rate 0 every parameter must still equal the
checkpoint's, bit for bit, for each stage change of the recipes: dense -> dense (LLaVA
stage 1 -> 2, MoE-LLaVA stage 1 -> 2), dense -> MoD (p-MoD) and dense -> MoE (an
upcycled checkpoint into MoE-LLaVA stage 3).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core.utils import unwrap_model

from megamod.config import CheckpointConfig
from megamod.training import checkpoint, loop
from tests.launcher import world_of_one

QUIET = ["logging.tensorboard_dir=null", "checkpoint.save_dir=null",
         "checkpoint.save_interval=null", "train.train_iters=1"]
FRESH = (".mod_router.", ".mlp.router.")  # parameters the later stage adds


def _perturbed_checkpoint(save_dir, overrides: list[str]) -> dict[str, torch.Tensor]:
    """A weights-only checkpoint whose weights are NOT the seed's initialisation (so a
    run that fell back to its initialisation is told apart); returns its tensors."""
    with world_of_one(QUIET + overrides) as config:
        state = loop.setup(config)
        model = unwrap_model(state.model)
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator).to(p.dtype))
        checkpoint.save_checkpoint(save_dir, 0, model, None, None, {}, config)
        state.loader.close()
        return {k: v.detach().clone() for k, v in model.state_dict().items()
                if not k.endswith("_extra_state")}


@pytest.mark.parametrize("dtype,stage", [
    ("bf16", []),
    ("fp16", []),
    ("bf16", ["mod.enabled=true"]),
    ("bf16", ["moe.num_experts=4", "moe.layer_freq=2"]),
])
def test_finetune_keeps_the_loaded_weights(tmp_path, dtype, stage):
    precision = [f"precision.params_dtype={dtype}"]
    if dtype == "fp16":  # a static scale: the step is taken, not skipped as an overflow
        precision.append("precision.loss_scale=1.0")
    loaded = _perturbed_checkpoint(tmp_path / "stage_a", precision)
    if "moe.num_experts=4" in stage:
        from megamod.cli.upcycle import upcycle

        upcycle(tmp_path / "stage_a", tmp_path / "upcycled", 4, 2)
        loaded = None  # the experts are copies: compared below through the dense FFNs
        load_dir = tmp_path / "upcycled"
    else:
        load_dir = tmp_path / "stage_a"
    overrides = QUIET + precision + stage + ["train.lr=0.0", "train.min_lr=0.0"]
    with world_of_one(overrides) as config:
        config = dataclasses.replace(
            config, checkpoint=CheckpointConfig(load=str(load_dir), finetune=True)
        )
        state = loop.setup(config)
        model = unwrap_model(state.model)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()
                  if not k.endswith("_extra_state")}
        metrics = loop.train_step(state, state.loader.next_step())
        state.loader.close()
        assert metrics["train/grad_norm"] == metrics["train/grad_norm"], "the step was skipped"
        after = {k: v.detach().clone() for k, v in model.state_dict().items()
                 if not k.endswith("_extra_state")}
    for key, tensor in after.items():
        assert torch.equal(tensor, before[key]), f"{key} changed at lr 0"
        if loaded is not None and not any(f in key for f in FRESH):
            assert torch.equal(tensor, loaded[key]), f"{key} is not the checkpoint's"
    if loaded is None:  # MoE: every expert still holds its dense FFN's perturbed weights
        dense = _dense_weights(tmp_path / "stage_a", precision)
        fc1 = [v for k, v in after.items() if ".mlp.experts." in k and "linear_fc1.weight" in k]
        assert fc1 and all(torch.equal(w, dense["language_model.decoder.layers.0.mlp.linear_fc1.weight"])
                           for w in fc1[:4])


def _dense_weights(load_dir, precision: list[str]) -> dict[str, torch.Tensor]:
    from megamod.data.tokenizer import load_tokenizer
    from megamod.models.build import build_model

    with world_of_one(QUIET + precision) as config:
        model = build_model(config, load_tokenizer("tiny"))
        checkpoint.load_model_weights(load_dir, model)
        return {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()
                if not k.endswith("_extra_state")}
