"""p-MoD training through the CLI, as a user runs it: the issue's acceptance command (MoD +
MoE at TP=2 + SP + EP=2 on 2 processes) with its TensorBoard tags, and a dense checkpoint
fine-tuned into a MoD model (zero routers: every weight 1) without a jump in the loss."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.launcher import megamod_train
from tests.training.test_checkpoint import step_losses

QUIET = ["checkpoint.save_interval=null", "logging.tensorboard_dir=null"]


@pytest.fixture(scope="module")
def mod_moe_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mod_moe")
    result = megamod_train(
        2, ["mod.enabled=true", "moe.num_experts=4", "moe.router_topk=2", "moe.layer_freq=2",
            "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
            "parallel.expert_model_parallel_size=2", "parallel.expert_tensor_parallel_size=1",
            "train.train_iters=3", f"checkpoint.save_dir={root}/ckpt",
            f"logging.tensorboard_dir={root}/tb"],
        cwd=root,
    )
    (root / "stdout.txt").write_text(result.stdout)
    return root


def test_mod_moe_at_tp2_sp_ep2_logs_kept_ratios(mod_moe_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(mod_moe_run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    # The tiny decoder's PRD: layers 1, 2, 3 keep 75, 25, 15 % (trunc per sample: at most).
    for layer, ratio in ((1, 0.75), (2, 0.25), (3, 0.15)):
        kept = [e.value for e in events.Scalars(f"mod/kept_ratio/layer{layer}")]
        assert len(kept) == 3 and all(ratio - 0.1 < k <= ratio for k in kept), (layer, kept)
        weights = events.Scalars(f"mod/router_weight/mean/layer{layer}")
        assert all(0.8 <= e.value <= 1.2 for e in weights)  # TanhNorm's range
    assert "mod/kept_ratio/layer0" not in tags
    assert {"moe/aux_loss", "moe/expert_load/image/layer0/expert0"} <= tags
    flops = [e.value for e in events.Scalars("train/tflops_per_step")]
    assert len(flops) == 3 and all(f > 0 for f in flops)
    assert (mod_moe_run / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


def test_dense_checkpoint_starts_mod_training_without_a_jump(tmp_path):
    """Fresh dense training, then from its checkpoint one step of dense and one of MoD
    (PRD) fine-tuning: all three start on the same first batch."""
    fresh = step_losses(megamod_train(
        1, ["train.train_iters=6", f"checkpoint.save_dir={tmp_path}/dense",
            "logging.tensorboard_dir=null"], cwd=tmp_path).stdout)
    finetune = [f"checkpoint.load={tmp_path}/dense", "checkpoint.finetune=true",
                "train.train_iters=1", "checkpoint.save_dir=null", *QUIET]
    dense = step_losses(megamod_train(1, finetune, cwd=tmp_path).stdout)[1]
    mod = step_losses(megamod_train(1, ["mod.enabled=true", *finetune], cwd=tmp_path).stdout)[1]
    assert dense < fresh[1] - 1.0, "the dense weights should already fit the data"
    # Dropping vision tokens (the skipped ones pass through with w = 1) costs a little:
    # far less than what the dense training gained.
    assert abs(mod - dense) < 0.25 * (fresh[1] - dense)
