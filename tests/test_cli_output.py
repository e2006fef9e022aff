"""What the tools write never deletes an input or a running job's checkpoints."""

from __future__ import annotations

import os

import pytest

from megamod.cli.output import check_output, staged
from megamod.errors import CheckpointError
from megamod.training.checkpoint import LOCK_FILE, SaveDirLock


@pytest.fixture
def run_dir(tmp_path):
    """runs/x with a checkpoint folder inside, as a training run leaves it."""
    ckpt = tmp_path / "runs" / "x" / "ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("3\n")
    return ckpt.parent


@pytest.mark.parametrize("output", ["x", "x/ckpt", "x/ckpt/sub", "x/./ckpt/.."])
def test_an_output_overlapping_the_input_is_refused_even_with_force(run_dir, output):
    target = run_dir.parent / output
    with pytest.raises(CheckpointError, match="overlaps the input"):
        check_output(target, [run_dir / "ckpt"], force=True)


def test_a_sibling_output_is_fine_and_existing_needs_force(run_dir):
    sibling = run_dir / "ckpt2"
    check_output(sibling, [run_dir / "ckpt"], force=False)
    sibling.mkdir()
    (sibling / "f").write_text("x")
    with pytest.raises(CheckpointError, match="--force"):
        check_output(sibling, [run_dir / "ckpt"], force=False)
    check_output(sibling, [run_dir / "ckpt"], force=True)


def test_a_running_jobs_save_dir_is_refused_even_with_force(tmp_path):
    save_dir = tmp_path / "job"
    lock = SaveDirLock(save_dir)
    lock.acquire()  # as a training job holds it
    try:
        with pytest.raises(CheckpointError, match="running job"):
            check_output(save_dir, [tmp_path / "input"], force=True)
    finally:
        lock.release()
    assert (save_dir / LOCK_FILE).exists()  # a released lock file alone is no job
    check_output(save_dir, [tmp_path / "input"], force=True)


@pytest.mark.parametrize("command", ["convert", "upcycle"])
def test_the_commands_keep_their_input(run_dir, command):
    from megamod.__main__ import main

    args = {
        "convert": ["convert", "--from", "megamod", "--to", "hf"],
        "upcycle": ["upcycle", "--num-experts", "4", "--layer-freq", "2"],
    }[command]
    code = main(args + ["--input", str(run_dir / "ckpt"), "--output", str(run_dir), "--force"])
    assert code == 2
    assert (run_dir / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "3\n"


def test_staged_replaces_only_when_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("kept until the new one is whole")
    with pytest.raises(RuntimeError):
        with staged(out) as staging:
            (staging / "new").write_text("half")
            raise RuntimeError("killed mid-write")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "old").exists()
    with staged(out) as staging:
        (staging / "new").write_text("whole")
    assert [p.name for p in out.iterdir()] == ["new"]


def test_staged_holds_the_outputs_save_dir_lock_until_it_is_replaced(tmp_path):
    """A training started into --output while a tool writes it is refused by the lock,
    instead of saving checkpoints the replacement would delete."""
    out = tmp_path / "out"
    with staged(out) as staging:
        with pytest.raises(CheckpointError, match=f"in use by pid {os.getpid()}"):
            SaveDirLock(out).acquire()  # the training's first step
        (staging / "new").write_text("whole")
    assert [p.name for p in out.iterdir()] == ["new"]
    job = SaveDirLock(out)
    job.acquire()  # free once the tool is done
    job.release()


def test_staged_refuses_a_job_started_since_check_output(run_dir):
    """The tools check --output first, then read their input for a while: a job that took
    the folder meanwhile keeps it, checkpoints and all."""
    out = run_dir / "ckpt"
    check_output(out, [run_dir.parent / "input"], force=True)
    job = SaveDirLock(out)
    job.acquire()
    try:
        with pytest.raises(CheckpointError, match="running job"):
            with staged(out):
                pytest.fail("staged wrote while a job trains into --output")
    finally:
        job.release()
    assert sorted(p.name for p in out.iterdir()) == ["latest_checkpointed_iteration.txt", LOCK_FILE]
    assert not (run_dir / ".ckpt.staging").exists()


def test_a_failed_write_leaves_no_trace_of_the_lock(tmp_path):
    """A rerun finds --output as it was: absent, or without a lock file it needs --force for."""
    for out in (tmp_path / "absent", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(RuntimeError):
            with staged(out):
                raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    assert not any((tmp_path / "empty").iterdir())
