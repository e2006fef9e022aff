"""Checkpoints through the CLI: exact resume, TP=2 -> TP=1 resharding, torn writes.

Run A trains 10 steps at TP=2 + SP, saving every 5. Run B resumes from A's iteration-5
checkpoint (copied to a fresh save_dir, as if A had been stopped there) and must
reproduce A's losses at steps 6..10 exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megamod.data.tokenizer import load_tokenizer
from tests.launcher import (
    REPO, TINY_CONFIG, env as _env, free_port, launch, megamod_commands, megamod_train, run,
)

WORKER = str(REPO / "tests" / "training" / "parallel_worker.py")
TINY_VOCAB = load_tokenizer("tiny").vocab_size
TP2_SP = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]


def step_losses(stdout: str) -> dict[int, float]:
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {r["iteration"]: r["train/loss"] for r in records if "iteration" in r}


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run_a")
    result = megamod_train(
        2, TP2_SP + ["train.train_iters=10", "checkpoint.save_interval=5",
                     f"checkpoint.save_dir={root}/ckpt", f"logging.tensorboard_dir={root}/tb"],
        cwd=root,
    )
    (root / "stdout.txt").write_text(result.stdout)
    return root


def test_start_line_says_where_outputs_go(run_a):
    first = json.loads(next(l for l in (run_a / "stdout.txt").read_text().splitlines() if l.startswith("{")))
    assert first["event"] == "start" and first["tensor_model_parallel_size"] == 2
    assert first["checkpoints"] == str(run_a / "ckpt") and first["tensorboard"] == str(run_a / "tb")


def test_checkpoint_layout(run_a):
    ckpt = run_a / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    for it in (5, 10):
        assert (ckpt / f"iter_{it:07d}" / "metadata.json").is_file()
    assert not list(ckpt.glob(".tmp*")), "temporary folders must be renamed away"


def test_tensorboard_scalars(run_a):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_a / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/step_time",
                "data/wait_fraction", "data/skipped_samples", "data/truncated_samples"):
        assert tag in tags
        assert [e.step for e in events.Scalars(tag)] == list(range(1, 11))
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx(list(step_losses((run_a / "stdout.txt").read_text()).values()), rel=1e-5)
    assert losses[-1] < losses[0] - 0.5, "the loss should clearly fall"
    assert {e.value for e in events.Scalars("data/skipped_samples")} == {0.0}  # tiny is clean


def stopped_at(save_dir: Path, iteration: int, dest: Path) -> Path:
    """A save_dir holding only `iteration` of `save_dir`: as if that run had stopped there."""
    dest.mkdir()
    shutil.copytree(save_dir / f"iter_{iteration:07d}", dest / f"iter_{iteration:07d}")
    (dest / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    return dest


def test_resume_reproduces_uninterrupted_run(run_a, tmp_path):
    resume_dir = stopped_at(run_a / "ckpt", 5, tmp_path / "ckpt")
    result = megamod_train(
        2, TP2_SP + ["train.train_iters=10", f"checkpoint.load={resume_dir}",
                     f"checkpoint.save_dir={resume_dir}", "logging.tensorboard_dir=null"],
        cwd=tmp_path,
    )
    uninterrupted = step_losses((run_a / "stdout.txt").read_text())
    resumed = step_losses(result.stdout)
    assert sorted(resumed) == [6, 7, 8, 9, 10]
    for it, loss in resumed.items():
        assert loss == pytest.approx(uninterrupted[it], abs=1e-6), f"step {it}"


def test_finetune_starts_a_new_stage_from_the_weights(run_a, tmp_path):
    """checkpoint.finetune: trained weights, but iteration 0, a fresh optimizer and schedule
    and a new stage's trainable parts (stage 1 -> projector only), at another TP size."""
    result = megamod_train(
        2, ["train.train_iters=2", "train.trainable=[projector]", "checkpoint.finetune=true",
            f"checkpoint.load={run_a / 'ckpt'}", "checkpoint.save_dir=null",
            "checkpoint.save_interval=null", "logging.tensorboard_dir=null"],
        cwd=tmp_path,
    )
    start = json.loads(next(l for l in result.stdout.splitlines() if l.startswith("{")))
    assert start["start_iteration"] == 0
    assert start["trainable_parameters_per_rank"] < start["parameters_per_rank"] / 10
    losses = step_losses(result.stdout)
    fresh = step_losses((run_a / "stdout.txt").read_text())
    assert sorted(losses) == [1, 2]
    assert losses[1] < fresh[1] - 1.0, "the loaded weights should already fit the data"


def test_a_resume_that_turns_mod_on_or_off_is_refused_and_writes_nothing(run_a, tmp_path):
    """Resuming (not finetuning) with another mod.enabled would drop or add the routers
    mid-run: exit 2 naming the key, the save_dir untouched."""
    from megamod.config import load_config
    from megamod.errors import CheckpointError
    from megamod.models.build import build_model
    from megamod.training.checkpoint import config_for_load, save_checkpoint
    from tests.launcher import world_of_one

    save_dir = tmp_path / "ckpt"
    shutil.copytree(run_a / "ckpt", save_dir)
    before = sorted(p.name for p in save_dir.iterdir())
    result = run([sys.executable, "-m", "megamod", "train", str(TINY_CONFIG), "mod.enabled=true",
                  f"checkpoint.save_dir={save_dir}", "logging.tensorboard_dir=null"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "mod.enabled=false" in result.stderr and "checkpoint.finetune=true" in result.stderr
    assert sorted(p.name for p in save_dir.iterdir()) == before

    # The other way: a MoD checkpoint resumed with MoD off (its routers would be dropped).
    mod_dir = tmp_path / "mod_ckpt"
    with world_of_one(["mod.enabled=true"]) as mod_config:
        save_checkpoint(mod_dir, 2, build_model(mod_config, load_tokenizer("tiny")), None, None, {},
                        mod_config)
    with pytest.raises(CheckpointError) as error:
        config_for_load(mod_dir, load_config(TINY_CONFIG, []), TINY_VOCAB, finetune=False)
    message = str(error.value)
    assert "mod.enabled is true there but false here (resuming would drop its MoD routers)" in message
    assert "Set mod.enabled=true to resume it" in message and "checkpoint.finetune=true" in message


def test_tp2_checkpoint_loads_at_tp1_with_identical_logits(run_a, tmp_path):
    launch(2, [WORKER, "logits", str(tmp_path), str(run_a / "ckpt")], cwd=tmp_path)
    tp2, tp1 = torch.load(tmp_path / "logits_tp2.pt"), torch.load(tmp_path / "logits_tp1.pt")
    assert tp2.shape == tp1.shape and tp2.abs().sum() > 0
    torch.testing.assert_close(tp1, tp2, atol=1e-5, rtol=1e-5)


def test_unusable_checkpoints_exit_2_naming_the_problem(run_a, tmp_path):
    torn = stopped_at(run_a / "ckpt", 10, tmp_path / "torn")
    shard = sorted((torn / "iter_0000010").glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    def train_from(load: Path, *extra: str) -> list[str]:
        return ["train", str(TINY_CONFIG), "train.train_iters=11", f"checkpoint.load={load}",
                "checkpoint.save_dir=null", "checkpoint.save_interval=null", "logging.tensorboard_dir=null",
                *extra]

    # Messages and exit codes: the three commands in one process.
    other_shape, no_checkpoint, damaged = megamod_commands(
        [train_from(run_a / "ckpt", "model.language.ffn_hidden_size=320"), train_from(tmp_path),
         train_from(torn)], cwd=tmp_path)
    assert other_shape.returncode == 2, other_shape.stderr[-3000:]
    error = next(line for line in other_shape.stderr.splitlines() if line.startswith("error:"))
    assert "model.language.ffn_hidden_size is 352 there but 320 here" in error
    assert "model.language.ffn_hidden_size=352" in error and len(other_shape.stderr) < 2000
    assert no_checkpoint.returncode == 2
    assert "latest_checkpointed_iteration.txt does not exist" in no_checkpoint.stderr
    assert damaged.returncode == 2, damaged.stderr[-3000:]
    assert f"is damaged: {shard.name} is truncated" in damaged.stderr
    assert "model.*" not in damaged.stderr


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 1])


# What an interrupted copy or a full disk leaves; each must name the file, not the model.
DAMAGE = [
    (lambda d: _truncate(sorted(d.glob("*.distcp"))[0]), "__0_0.distcp is truncated"),
    (lambda d: sorted(d.glob("*.distcp"))[-1].unlink(), "__1_1.distcp is missing"),
    (lambda d: (d / ".metadata").unlink(), ".metadata is missing"),
    (lambda d: _truncate(d / ".metadata"), ".metadata cannot be read"),
    (lambda d: (d / "common.pt").unlink(), "common.pt is missing"),
    (lambda d: (d / "metadata.json").write_text("{"), "metadata.json is not valid JSON"),
]


@pytest.mark.parametrize("damage, words", DAMAGE, ids=[w for _, w in DAMAGE])
def test_damaged_checkpoints_name_the_file(run_a, tmp_path, damage, words):
    from megamod.errors import CheckpointError
    from megamod.training import checkpoint

    copy = stopped_at(run_a / "ckpt", 10, tmp_path / "ckpt")
    checkpoint.check_intact(copy / "iter_0000010")  # an intact copy passes
    damage(copy / "iter_0000010")
    with pytest.raises(CheckpointError) as error:
        checkpoint.saved_config(copy)  # the first read of a run that loads it
    assert f"is damaged: {words}" in str(error.value)
    assert "latest_checkpointed_iteration.txt" in str(error.value)  # the way out


def test_kill_during_checkpoint_write_keeps_previous_latest(tmp_path):
    save_dir = tmp_path / "ckpt"
    overrides = ["train.train_iters=4", "checkpoint.save_interval=2",
                 f"checkpoint.save_dir={save_dir}", "logging.tensorboard_dir=null"]
    # A plain single process (no torchrun, whose workers live in their own session), so
    # the kill reaches the trainer and its checkpoint-writer children at once.
    cmd = [sys.executable, "-m", "megamod", "train", str(TINY_CONFIG), *overrides]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env({"MASTER_PORT": str(free_port())}),
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    torn = save_dir / ".tmp_iter_0000004"
    deadline = time.time() + 240
    while not torn.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-write of iteration 4
    proc.wait()
    assert torn.exists(), "the second checkpoint write was never caught in progress"
    assert (save_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert not (save_dir / "iter_0000004").exists()

    # A resumed run takes iteration 2, finishes, and clears the torn folder away.
    result = megamod_train(1, overrides + [f"checkpoint.load={save_dir}"], cwd=tmp_path)
    assert sorted(step_losses(result.stdout)) == [3, 4]
    assert (save_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert not torn.exists()


# A full resume keeps what the checkpoint's tensors and optimizer state were saved for:
# each change is refused before loading, the key named in the message's first words.
LAYOUT_CHANGES = [
    (["precision.params_dtype=bf16"], "precision.params_dtype is fp32 there but bf16 here"),
    (["mod.enabled=true"], "mod.enabled is false there but true here"),
    (["model.language.hidden_size=256"], "model.language.hidden_size is 128 there but 256 here"),
    (["model.language.num_query_groups=4"], "model.language.num_query_groups is 2 there but 4 here"),
    (["model.vision.num_layers=4"], "model.vision.num_layers is 3 there but 4 here"),
    (["moe.num_experts=4"], "moe.num_experts is null there but 4 here"),
]


@pytest.mark.parametrize("overrides, words", LAYOUT_CHANGES, ids=[w.split()[0] for _, w in LAYOUT_CHANGES])
def test_a_resume_into_another_layout_names_the_key(run_a, overrides, words):
    from megamod.config import load_config
    from megamod.errors import CheckpointError
    from megamod.training.checkpoint import config_for_load

    with pytest.raises(CheckpointError) as error:
        config_for_load(run_a / "ckpt", load_config(TINY_CONFIG, TP2_SP + overrides), TINY_VOCAB,
                        finetune=False)
    first = str(error.value).split(". ")[0]
    assert first.startswith(f"checkpoint {run_a / 'ckpt'} ") and words in first, str(error.value)


def test_what_may_change_on_a_resume_or_a_new_stage_passes(run_a):
    from megamod.config import load_config
    from megamod.training.checkpoint import config_for_load

    def check(overrides: list[str], finetune: bool) -> None:
        config_for_load(run_a / "ckpt", load_config(TINY_CONFIG, TP2_SP + overrides), TINY_VOCAB,
                        finetune)

    # The same ViT layers are built (feature layer -3 of 4 is -2 of 3); RoPE has no tensors.
    check(["model.vision.num_layers=4", "model.vision.feature_layer=-3",
           "model.language.seq_length=256", "train.lr=1e-3"], finetune=False)
    # A new stage from the weights may change the dtype and add MoD routers.
    check(["precision.params_dtype=bf16", "mod.enabled=true"], finetune=True)


def test_a_tensor_mismatch_lists_a_few_keys_not_all(run_a):
    """A new stage whose model wants tensors the checkpoint lacks (LayerNorm biases):
    megatron-core's message lists every saved key; the error keeps three and a count."""
    from megamod.config import load_config
    from megamod.data.tokenizer import load_tokenizer
    from megamod.errors import CheckpointError
    from megamod.models.build import build_model
    from megamod.parallel import world_of_one
    from megamod.training.checkpoint import config_for_load, load_model_weights

    tokenizer = load_tokenizer("tiny")
    config = config_for_load(run_a / "ckpt", load_config(TINY_CONFIG, [
        "model.language.normalization=LayerNorm", "checkpoint.save_dir=null",
        "checkpoint.save_interval=null"]), tokenizer.vocab_size, finetune=True)
    with world_of_one(config.parallel, config.train.seed, "tests"):
        with pytest.raises(CheckpointError) as error:
            load_model_weights(run_a / "ckpt", build_model(config, tokenizer))
    message = str(error.value)
    shortened = re.search(r"\.\.\. \((\d+) more\)\]", message)
    assert "cannot be loaded into this model" in message and shortened, message
    assert int(shortened[1]) > 50 and len(message) < 1500, message


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_full_disk_during_a_save_says_so_and_keeps_the_latest(tmp_path, monkeypatch, caplog):
    """The shard writer (a forked process per bucket, as on a real run) fails with ENOSPC
    while writing iteration 2: exit-2 error naming the disk and the save_dir, and no
    megatron-core log line of it before; iteration 1 stays the latest, byte for byte, and
    the partial folder is gone."""
    import errno

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megamod.data.tokenizer import load_tokenizer
    from megamod.errors import CheckpointError
    from megamod.models.build import build_model
    from megamod.training.checkpoint import check_intact, save_checkpoint
    from tests.launcher import world_of_one

    save_dir = tmp_path / "ckpt"
    with world_of_one() as config:
        model = build_model(config, load_tokenizer(config.data.tokenizer))
        save_checkpoint(save_dir, 1, model, None, None, {}, config)
        before = _files(save_dir / "iter_0000001")

        def disk_full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(filesystem_async, "_write_item", disk_full)
        caplog.clear()
        with pytest.raises(CheckpointError) as error:
            save_checkpoint(save_dir, 2, model, None, None, {}, config)
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("megatron")]
    message = str(error.value)
    assert f"saving iteration 2 into checkpoint.save_dir {save_dir} failed: the disk is full" in message
    assert f"{save_dir / 'iter_0000001'}, is intact" in message
    assert (save_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert _files(save_dir / "iter_0000001") == before
    check_intact(save_dir / "iter_0000001")
    assert sorted(p.name for p in save_dir.iterdir()) == [
        "iter_0000001", "latest_checkpointed_iteration.txt"]
