"""Non-finite steps: every rank skips the update together, and a poisoned model is never
saved.

Run A: 2 processes (DP=2), a NaN injected into one gradient of rank 1 at iteration 3,
a checkpoint after every step: iterations 2 and 3 hold bit-identical model and optimizer
state, the LR schedule does not advance over the skipped step, training goes on.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tests.launcher import TINY_CONFIG, free_port, megamod_train, run, world_of_one

QUIET = ["checkpoint.save_dir=null", "checkpoint.save_interval=null", "logging.tensorboard_dir=null"]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("nan")
    result = megamod_train(2, ["stability.inject_nan_at=3", "train.train_iters=5",
                               "checkpoint.save_interval=1", f"checkpoint.save_dir={root}/ckpt",
                               "logging.tensorboard_dir=null"], cwd=root)
    (root / "stdout.txt").write_text(result.stdout)
    records = [json.loads(l) for l in result.stdout.splitlines() if l.startswith('{"iteration"')]
    return root, records


def test_one_rank_sees_nan_and_every_rank_skips(run_a):
    root, records = run_a
    assert "iteration 3: non-finite loss or gradient, first seen on rank 1" in (root / "stdout.txt").read_text()
    assert [r["train/skipped_steps"] for r in records] == [0, 0, 1, 1, 1]
    assert math.isnan(records[2]["train/grad_norm"])
    assert all(math.isfinite(r["train/loss"]) for r in records)
    assert records[3]["train/lr"] == records[2]["train/lr"]  # the schedule did not advance


def test_the_skipped_step_changes_no_state(run_a, tmp_path):
    from megatron.core import dist_checkpointing

    root, _ = run_a
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        before, skipped, after = (
            dist_checkpointing.load_plain_tensors(str(root / "ckpt" / f"iter_{i:07d}"))
            for i in (2, 3, 4)
        )
    finally:
        torch.distributed.destroy_process_group()
    state_keys = [k for k in before if k.startswith(("language_model.", "optimizer.state."))]
    assert any(k.startswith("optimizer.state.exp_avg.") for k in state_keys)
    assert all(torch.equal(before[k], skipped[k]) for k in state_keys)
    assert not all(torch.equal(skipped[k], after[k]) for k in state_keys)


def test_stop_mode_ends_the_run_naming_iteration_and_rank(tmp_path):
    result = run([sys.executable, "-m", "megamod", "train", str(TINY_CONFIG), *QUIET,
                  "stability.on_nonfinite=stop", "stability.inject_nan_at=2", "train.train_iters=3"],
                 cwd=tmp_path, extra_env={"MASTER_PORT": str(free_port())})
    assert result.returncode != 0
    assert "iteration 2: non-finite loss or gradient, first seen on rank 0" in result.stderr


def test_a_poisoned_model_is_never_saved(tmp_path):
    from megatron.core.utils import unwrap_model

    from megamod.errors import CheckpointError
    from megamod.training import checkpoint
    from megamod.training.loop import setup

    with world_of_one(QUIET) as config:
        state = setup(config)
        model = unwrap_model(state.model)
        checkpoint.save_checkpoint(tmp_path, 1, model, state.optimizer, state.scheduler, {}, config)
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("inf")
        with pytest.raises(CheckpointError, match="non-finite parameters at iteration 2"):
            checkpoint.save_checkpoint(tmp_path, 2, model, state.optimizer, state.scheduler, {}, config)
        state.loader.close()
    assert checkpoint.read_latest_iteration(tmp_path) == 1
    assert not (tmp_path / "iter_0000002").exists() and not list(tmp_path.glob(".tmp*"))
