"""MoE training through the CLI, as a user runs it: the issue's acceptance command at EP=2,
its TensorBoard tags, and a checkpoint saved at EP=2 resumed at EP=1.

Run A: 2 processes, EP=2 (DP=2), 4 steps, checkpoints at 2 and 4, TensorBoard on. Run B
resumes A's iteration-2 checkpoint at EP=1 (still DP=2, so the same data order) and must
reproduce A's losses at steps 3 and 4 (the two layouts compute the same step:
tests/moe/test_parallel.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.launcher import megamod_train
from tests.training.test_checkpoint import step_losses, stopped_at

MOE = ["moe.num_experts=4", "moe.router_topk=2", "moe.layer_freq=2"]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("moe_run_a")
    result = megamod_train(
        2, MOE + ["parallel.expert_model_parallel_size=2", "train.train_iters=4",
                  "checkpoint.save_interval=2", f"checkpoint.save_dir={root}/ckpt",
                  f"logging.tensorboard_dir={root}/tb", "logging.moe_heatmap_interval=2"],
        cwd=root,
    )
    (root / "stdout.txt").write_text(result.stdout)
    return root


def test_console_line_carries_moe_summary_only(run_a):
    lines = [l for l in (run_a / "stdout.txt").read_text().splitlines() if '"iteration"' in l]
    assert len(lines) == 4
    assert all('"moe/aux_loss"' in l and '"moe/dropped_fraction"' in l for l in lines)
    assert not any("expert_load" in l for l in lines)  # per-expert tags: TensorBoard only


def test_tensorboard_moe_tags(run_a):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_a / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])

    def last(tag: str) -> float:
        return events.Scalars(tag)[-1].value

    aux = [e.value for e in events.Scalars("moe/aux_loss")]
    assert len(aux) == 4 and all(0.9 < a < 4.0 for a in aux)  # 1.0 = perfectly balanced
    assert {"moe/aux_loss/layer0", "moe/aux_loss/layer2"} <= tags
    assert "moe/aux_loss/layer1" not in tags  # a dense layer
    assert last("moe/dropped_fraction") == 0.0  # dropless by default
    for layer in (0, 2):
        for prefix in ("moe/expert_load", "moe/expert_load/text", "moe/expert_load/image"):
            shares = [last(f"{prefix}/layer{layer}/expert{e}") for e in range(4)]
            assert sum(shares) == pytest.approx(1.0, abs=1e-5), (prefix, layer)
    assert "moe/expert_load/layer1/expert0" not in tags
    heatmaps = events.Images("moe/expert_load_heatmap")
    assert [h.step for h in heatmaps] == [2, 4]


def test_ep2_checkpoint_resumes_at_ep1_with_equal_losses(run_a, tmp_path):
    resume_dir = stopped_at(run_a / "ckpt", 2, tmp_path / "ckpt")
    result = megamod_train(
        2, MOE + ["train.train_iters=4", f"checkpoint.load={resume_dir}",
                  f"checkpoint.save_dir={resume_dir}", "logging.tensorboard_dir=null"],
        cwd=tmp_path,
    )
    uninterrupted = step_losses((run_a / "stdout.txt").read_text())
    resumed = step_losses(result.stdout)
    assert sorted(resumed) == [3, 4]
    for it, loss in resumed.items():
        assert loss == pytest.approx(uninterrupted[it], abs=1e-5), f"step {it}"
    assert np.isfinite(list(resumed.values())).all()
