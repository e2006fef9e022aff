"""Bad steps: skipped on every rank together, spikes, rollbacks, and a poisoned model is
never saved.

Run A (2 processes, DP=2, bf16): a NaN injected into one gradient of rank 1 at iteration
3 and a checkpoint after every step: iterations 2 and 3 hold bit-identical model and
optimizer state (fp32 main params included), the LR schedule does not advance over the
skipped step, training goes on with a finite loss (the acceptance run of issue 10).

Run R (2 processes, DP=2): NaNs at 5, 6, 7 (three skips in a row: a rollback to iteration
4, skipping 2 steps' batches), a gradient-norm spike at 9 (skipped), NaNs at 10 and 11
(three skips in a row again, past stability.max_rollbacks=1: the run stops with exit 2,
the checkpoint of iteration 8 intact).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

from megamod.config import StabilityConfig
from megamod.training.stability import SpikeDetector, StabilityGuard
from tests.launcher import (TINY_CONFIG, free_port, megamod_train, run, torchrun_command,
                            world_of_one)

QUIET = ["checkpoint.save_dir=null", "checkpoint.save_interval=null", "logging.tensorboard_dir=null"]


def records(stdout: str) -> list[dict]:
    return [json.loads(l) for l in stdout.splitlines() if l.startswith('{"iteration"')]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("nan")
    result = megamod_train(2, ["precision.params_dtype=bf16", "stability.inject_nan_at=3",
                               "train.train_iters=5", "checkpoint.save_interval=1",
                               f"checkpoint.save_dir={root}/ckpt", "logging.tensorboard_dir=null"],
                           cwd=root)
    (root / "stdout.txt").write_text(result.stdout)
    return root, records(result.stdout)


def test_one_rank_sees_nan_and_every_rank_skips(run_a):
    root, steps = run_a
    assert "iteration 3: non-finite gradient, first seen on rank 1" in (root / "stdout.txt").read_text()
    assert [r["train/skipped_steps"] for r in steps] == [0, 0, 1, 1, 1]
    assert math.isnan(steps[2]["train/grad_norm"])
    assert all(math.isfinite(r["train/loss"]) for r in steps)
    assert steps[3]["train/lr"] == steps[2]["train/lr"]  # the schedule did not advance


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
    assert any(k.startswith("optimizer.state.fp32_param.") for k in state_keys)  # main params
    assert before["language_model.embedding.word_embeddings.weight"].dtype == torch.bfloat16
    assert all(torch.equal(before[k], skipped[k]) for k in state_keys)
    assert not all(torch.equal(skipped[k], after[k]) for k in state_keys)


def test_stop_mode_ends_the_run_naming_iteration_and_rank(tmp_path):
    result = run([sys.executable, "-m", "megamod", "train", str(TINY_CONFIG), *QUIET,
                  "stability.on_nonfinite=stop", "stability.inject_nan_at=2", "train.train_iters=3"],
                 cwd=tmp_path, extra_env={"MASTER_PORT": str(free_port())})
    assert result.returncode != 0
    assert "iteration 2: non-finite gradient, first seen on rank 0" in result.stderr


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


def test_fp16_overflow_is_expected_until_the_loss_scale_cannot_come_down():
    """Even with on_nonfinite=stop, an overflow the dynamic loss scale absorbs only skips
    the step; at min_loss_scale the same overflow is a failure."""
    from megamod.training.loop import setup, train_step

    overrides = QUIET + ["precision.params_dtype=fp16", "precision.initial_loss_scale=2048",
                         "precision.min_loss_scale=1024", "precision.hysteresis=1",
                         "stability.on_nonfinite=stop", "stability.inject_nan_at=[1,2]"]
    with world_of_one(overrides) as config:
        state = setup(config)
        train_step(state, state.loader.next_step())
        state.iteration += 1
        assert state.guard.scalars()["train/loss_scale"] == 1024.0
        assert (state.guard.overflows, state.guard.skipped) == (1, 0)
        with pytest.raises(RuntimeError, match=r"iteration 2: non-finite gradient the fp16 loss "
                                               r"scale \(1024, minimum or static\) cannot absorb"):
            train_step(state, state.loader.next_step())
        state.loader.close()


def _nonfinite_worker(rank: int, port: int, results: dict) -> None:
    """One of 2 gloo ranks: rank 0 sees an inf gradient, rank 1 a NaN loss and NaN
    gradients. Records what `_first_bad_ranks` answers, its collectives and its reads of
    device values to the host (each a device sync on a GPU)."""
    from types import SimpleNamespace

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=2)
    try:
        grads = torch.ones(8)
        grads[3] = float("inf") if rank == 0 else float("nan")
        model = SimpleNamespace(buffers=[SimpleNamespace(grad_data=torch.ones(4))],
                                expert_parallel_buffers=[SimpleNamespace(grad_data=grads)])
        totals = torch.tensor([float("nan") if rank == 1 else 5.0, 10.0])
        calls = []

        def counted(owner, name):
            original = getattr(owner, name)

            def call(*args, **kwargs):
                calls.append(name)
                return original(*args, **kwargs)

            setattr(owner, name, call)

        for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast"):
            counted(torch.distributed, name)
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
            counted(torch.Tensor, name)
        answer = StabilityGuard._first_bad_ranks(totals, model)
        results[rank] = (answer, calls)
    finally:
        torch.distributed.destroy_process_group()


def test_the_first_bad_ranks_take_one_collective_and_one_host_read():
    """Every rank learns the lowest rank that saw a non-finite loss (1) and gradient (0)
    from one collective and one read of its result to the host, at any world size (one
    `.item()` per rank and flag before: a GPU sync each)."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_nonfinite_worker, args=(free_port(), results), nprocs=2)
    for rank in range(2):
        answer, calls = results[rank]
        assert answer == (1, 0), rank
        collectives = [c for c in calls if c.startswith(("all_", "broadcast"))]
        assert len(collectives) == 1 and len(calls) - len(collectives) == 1, calls


# ------------------------------------------------------------------------------ spikes


def test_spike_zscores_against_the_window():
    detector = SpikeDetector(zscore=4.0, window=4)
    history = [2.0, 2.5, 1.5, 3.0]
    for i, value in enumerate(history):
        assert detector.zscores({"loss": value}) == {}, "no verdict before the window is full"
        detector.record({"loss": value})
    mean, std = statistics.fmean(history), statistics.pstdev(history)
    assert detector.zscores({"loss": 5.0})["loss"] == pytest.approx((5.0 - mean) / std)
    assert detector.spikes({"loss": mean + 3.9 * std}) == {}
    assert list(detector.spikes({"loss": mean + 4.1 * std})) == ["loss"]
    assert detector.spikes({"loss": -100.0}) == {}, "one-sided: a falling loss is no spike"
    detector.record({"loss": 10.0})  # the window slides: 2.5, 1.5, 3.0, 10.0
    assert detector.zscores({"loss": 5.0})["loss"] == pytest.approx(
        (5.0 - statistics.fmean([2.5, 1.5, 3.0, 10.0])) / statistics.pstdev([2.5, 1.5, 3.0, 10.0]))
    flat = SpikeDetector(zscore=4.0, window=2)
    flat.record({"loss": 1.0})
    flat.record({"loss": 1.0})
    assert flat.zscores({"loss": 9.0}) == {}, "a window without spread judges nothing"


@pytest.mark.parametrize("skip, expected", [(None, 70), (0, 30), (3, 60)])
def test_rollback_data_position(skip, expected):
    guard = StabilityGuard(StabilityConfig(skip_batches_on_rollback=skip), None)
    # checkpoint at 30 samples consumed, failure at 70, 10 samples a step
    assert guard.rollback_data_position(saved=30, failed=70, global_batch_size=10) == expected


SPIKY = QUIET + ["precision.params_dtype=bf16", "stability.spike_zscore=1000",
                 "stability.spike_window=3", "stability.inject_spike_at=5"]


def snapshot(state) -> dict[str, torch.Tensor]:
    from megatron.core.utils import unwrap_model

    tensors = {f"param {n}": p.detach().clone() for n, p in unwrap_model(state.model).named_parameters()}
    for i, sub in enumerate(state.optimizer.chained_optimizers):
        for j, main in enumerate(p for g in sub.param_groups for p in g["params"]):
            tensors[f"main {i}.{j}"] = main.detach().clone()
            for key, value in sub.optimizer.state[main].items():
                tensors[f"adam {i}.{j}.{key}"] = torch.as_tensor(value).clone()
    tensors["lr"] = torch.tensor(state.optimizer.param_groups[0]["lr"])
    return tensors


@pytest.mark.parametrize("on_spike", ["skip", "log"])
def test_a_spike_is_skipped_like_a_nan_or_only_logged(on_spike):
    from megamod.training.loop import setup, train_step

    with world_of_one(SPIKY + [f"stability.on_spike={on_spike}"]) as config:
        state = setup(config)
        for _ in range(4):  # fills the window of 3
            train_step(state, state.loader.next_step())
            state.iteration += 1
        before = snapshot(state)
        metrics = train_step(state, state.loader.next_step())  # iteration 5: grads x 1e6
        state.iteration += 1
        after = snapshot(state)
        assert metrics["train/grad_norm"] > 1e5 and state.guard.spikes == 1
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        if on_spike == "skip":
            assert changed == set() and state.guard.skipped == 1
        else:
            assert any(k.startswith("adam") for k in changed) and state.guard.skipped == 0
        train_step(state, state.loader.next_step())
        assert state.guard.spikes == 1, "the next step is no spike"
        state.loader.close()


# ---------------------------------------------------------------------------- rollback


@pytest.fixture(scope="module")
def run_r(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("rollback")
    overrides = ["train.train_iters=12", "checkpoint.save_interval=4", f"checkpoint.save_dir={root}/ckpt",
                 "logging.tensorboard_dir=null", "stability.inject_nan_at=[5,6,7,10,11]",
                 "stability.inject_spike_at=9", "stability.spike_zscore=1000",
                 "stability.spike_window=3", "stability.max_consecutive_skips=3",
                 "stability.max_rollbacks=1", "stability.skip_batches_on_rollback=2"]
    result = run(torchrun_command(2, ["-m", "megamod", "train", str(TINY_CONFIG), *overrides]),
                 cwd=root)
    return root, result


def test_rollback_reloads_the_last_good_checkpoint_and_skips_data(run_r):
    _, result = run_r
    steps = records(result.stdout)
    assert [r["iteration"] for r in steps] == [1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8, 9, 10, 11]
    assert "iteration 7: rolled back to iteration 4" in result.stdout
    first, again = steps[4], steps[7]  # iteration 5 before and after the rollback
    assert again["train/lr"] == first["train/lr"], "the schedule is back at iteration 4"
    # Skipped steps leave the model at iteration 4's, so the loss of iteration 7 (before)
    # was the iteration-4 model on batch 7: after the rollback and 2 skipped batches,
    # iteration 5 must see exactly that model and that batch.
    assert again["train/loss"] == pytest.approx(steps[6]["train/loss"], abs=1e-6)
    assert again["train/loss"] != first["train/loss"]
    assert [r["train/rollbacks"] for r in steps] == [0] * 7 + [1] * 7
    assert all(math.isfinite(r["train/loss"]) for r in steps)


def test_a_spike_is_skipped_on_every_rank(run_r):
    _, result = run_r
    steps = records(result.stdout)
    assert "iteration 9: spike: grad_norm" in result.stdout
    assert [r["train/spikes"] for r in steps] == [0] * 11 + [1] * 3
    assert [r["train/skipped_steps"] for r in steps] == [0] * 4 + [1, 2, 3] + [3] * 4 + [4, 5, 6]


def test_past_max_rollbacks_the_run_stops_with_the_last_good_checkpoint(run_r):
    root, result = run_r
    assert result.returncode != 0
    for rank in (0, 1):  # every rank reached the same verdict
        assert f"[rank {rank}] error: iteration 11: 3 steps skipped in a row" in result.stderr
    assert "stability.max_rollbacks=1" in result.stderr
    assert (root / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "8"
    assert sorted(p.name for p in (root / "ckpt").glob("iter_*")) == ["iter_0000004", "iter_0000008"]


def test_without_a_checkpoint_or_past_max_rollbacks_a_rollback_is_an_error():
    from megamod.training.stability import TrainingUnstableError

    guard = StabilityGuard(StabilityConfig(max_consecutive_skips=2, max_rollbacks=1), None)
    guard.consecutive_skips = 2
    assert guard.rollback_due()
    with pytest.raises(TrainingUnstableError, match="no checkpoint to roll back to: set checkpoint.save_dir"):
        guard.start_rollback(7, None)
    guard.start_rollback(7, "ckpt")
    assert (guard.rollbacks, guard.consecutive_skips, guard.rollback_due()) == (1, 0, False)
    guard.consecutive_skips = 2
    with pytest.raises(TrainingUnstableError, match="latest in ckpt, is intact"):
        guard.start_rollback(9, "ckpt")
