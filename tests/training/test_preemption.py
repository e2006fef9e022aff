"""Stopping and resuming without Slurm: workers die with their launcher, a dead job's lock
is taken over, a live one's refuses a second job, a save_dir resumes by itself with a
TensorBoard curve that holds every step once, a finished job says so.

Launch A (torchrun, one worker) is killed with `kill -9` of torchrun after its first
checkpoint; launch B (the same command, no checkpoint.load) must resume from it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megamod.config import CheckpointConfig
from megamod.errors import CheckpointError
from megamod.training.checkpoint import LOCK_FILE, SaveDirLock, start_from
from tests.launcher import TINY_CONFIG, env, free_port, run, torchrun_command, world_of_one
from tests.training.test_checkpoint import step_losses

DEAD_HOLDER = {"slurm_job_id": "999", "host": "gone", "pid": 2**22 + 1, "since": "2026-01-01"}


def overrides(root: Path) -> list[str]:
    return ["train.train_iters=6", "checkpoint.save_interval=2",
            f"checkpoint.save_dir={root}/ckpt", f"logging.tensorboard_dir={root}/tb"]


def train_cli(root: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megamod", "train", str(TINY_CONFIG), *overrides(root), *extra]
    return run(cmd, cwd=root, extra_env={"MASTER_PORT": str(free_port())})


def wait_for(condition, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def survivors(processes: list[psutil.Process], timeout: float = 30) -> list[str]:
    """The command lines of those of `processes` still running after up to `timeout`
    seconds; they are then killed. A zombie counts as ended: only its reaping is left, to
    PID 1, whatever that is here."""
    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.time() + timeout
    while any(map(running, processes)) and time.time() < deadline:
        time.sleep(0.1)
    left = [p for p in processes if running(p)]
    commands = [" ".join(p.cmdline()) for p in left]
    for p in left:
        p.kill()
    return commands


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("preempted")
    (root / "ckpt").mkdir()
    (root / "ckpt" / LOCK_FILE).write_text(json.dumps(DEAD_HOLDER))  # a dead job's lock

    # A: torchrun killed with -9 once its worker has saved iteration 2 and logged step 3.
    log = root / "a.log"
    with open(log, "w") as out:
        launcher = subprocess.Popen(
            torchrun_command(1, ["-m", "megamod", "train", str(TINY_CONFIG), *overrides(root)]),
            cwd=root, env=env({"PYTHONUNBUFFERED": "1"}), stdout=out, stderr=subprocess.STDOUT)
    wait_for(lambda: '"iteration": 3' in log.read_text() or launcher.poll() is not None,
             "step 3 of launch A")
    (worker,) = [p for p in psutil.Process(launcher.pid).children() if "megamod" in p.cmdline()]
    # The worker's own helpers too: the checkpoint writer's Manager and resource tracker.
    descendants = psutil.Process(launcher.pid).children(recursive=True)
    launcher.kill()
    launcher.wait()
    try:
        worker.wait(timeout=10)
        worker_died = True
    except psutil.TimeoutExpired:
        worker.kill()
        worker_died = False
    orphans = survivors(descendants)

    latest = int((root / "ckpt" / "latest_checkpointed_iteration.txt").read_text())

    # B: the same command again.
    resumed = train_cli(root)
    return {"root": root, "a": log.read_text(), "worker_died": worker_died, "orphans": orphans,
            "descendants": len(descendants), "latest": latest, "b": resumed}


def test_workers_die_with_a_killed_torchrun(runs):
    assert "saved checkpoint" in runs["a"] and '"iteration": 6' not in runs["a"]
    assert runs["worker_died"], "the worker trained on after its torchrun was killed"


def test_no_process_outlives_a_killed_torchrun(runs):
    assert runs["descendants"] > 1, "the worker had started no helper: nothing to check"
    assert not runs["orphans"], f"alive after kill -9 of torchrun: {runs['orphans']}"


def test_same_command_resumes_from_the_save_dir(runs):
    b = runs["b"]
    assert b.returncode == 0, b.stderr[-3000:]
    latest = runs["latest"]
    assert f"resumed from {runs['root'] / 'ckpt'} at iteration {latest}" in b.stdout
    assert sorted(step_losses(b.stdout)) == list(range(latest + 1, 7))
    # The dead holders' lock was taken over, and released at the end.
    assert (runs["root"] / "ckpt" / LOCK_FILE).read_text() == ""


def test_tensorboard_holds_every_step_once(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["root"] / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 7))
    # Steps past the checkpoint come from B, even those A had logged before it died.
    assert max(step_losses(runs["a"])) > runs["latest"], "A died at a checkpoint: nothing to purge"
    for step, loss in step_losses(runs["b"].stdout).items():
        assert losses[step] == pytest.approx(loss, rel=1e-5)


def test_finished_job_says_so_and_exits_0(runs):
    again = train_cli(runs["root"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is at iteration 6, train.train_iters=6: nothing to train" in again.stdout
    assert not step_losses(again.stdout)


def test_second_job_on_a_save_dir_is_refused_naming_the_holder(tmp_path):
    holder = SaveDirLock(tmp_path / "ckpt")
    holder.acquire()  # this pytest process plays the running job
    try:
        second = train_cli(tmp_path)
    finally:
        holder.release()
    assert second.returncode == 2
    assert f"pid {os.getpid()} on {socket.gethostname()}" in second.stderr
    assert "checkpoint.save_dir" in second.stderr and LOCK_FILE in second.stderr
    assert not (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").exists()


def test_lock_is_exclusive_until_released(tmp_path):
    first, second = SaveDirLock(tmp_path), SaveDirLock(tmp_path)
    first.acquire()
    with pytest.raises(CheckpointError, match=f"pid {os.getpid()}"):
        second.acquire()
    first.release()
    second.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    second.release()


def test_save_dir_checkpoint_wins_over_load(tmp_path):
    stage = CheckpointConfig(save_dir=str(tmp_path), load="stage1", finetune=True)
    assert start_from(stage) == ("stage1", True)  # nothing saved yet: the stage starts
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3\n")
    assert start_from(stage) == (str(tmp_path), False)  # requeued: it continues
    stage.auto_resume = False
    assert start_from(stage) == ("stage1", True)


def test_sigterm_asks_to_stop():
    from megamod.training.preemption import PreemptionWatcher

    # pytest's own handlers go back afterwards.
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        with world_of_one():
            watcher = PreemptionWatcher()
            assert not watcher.should_stop()
            os.kill(os.getpid(), signal.SIGTERM)
            assert watcher.should_stop() and watcher.received == "SIGTERM"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_first_ctrl_c_asks_to_stop_a_second_aborts(tmp_path, monkeypatch, capsys):
    """The second Ctrl-C ends `megamod` with 130 and one line naming the checkpoint the
    run resumes from, not a traceback and 1 (a bug's code)."""
    import types

    import megamod.__main__ as megamod_main
    from megamod.training.checkpoint import save_dir_locked
    from megamod.training.preemption import PreemptionWatcher

    save_dir = tmp_path / "ckpt"
    (save_dir / "iter_0000004").mkdir(parents=True)
    (save_dir / "latest_checkpointed_iteration.txt").write_text("4\n")
    stops = []

    def training(argv: list[str]) -> int:  # what `train` does around its steps
        with world_of_one(), save_dir_locked(save_dir):
            watcher = PreemptionWatcher()
            os.kill(os.getpid(), signal.SIGINT)
            stops.append(watcher.should_stop() and watcher.received == "SIGINT")
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes: it raises by then
        return 0

    monkeypatch.setitem(sys.modules, "megamod.cli.fake_train", types.SimpleNamespace(main=training))
    monkeypatch.setitem(megamod_main.COMMANDS, "fake-train", "fake_train")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        code = megamod_main.main(["fake-train"])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert stops == [True], "the first Ctrl-C did not ask to stop"
    assert code == 130
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("Ctrl-C: stopping after this step with a checkpoint")
    assert len(err) == 2, err  # one line each, no traceback
    assert "aborted by a second Ctrl-C" in err[1] and f"{save_dir / 'iter_0000004'}," in err[1]
    assert (save_dir / LOCK_FILE).read_text() == "", "the lock was not released"


def test_auto_resume_skips_a_weights_only_checkpoint(tmp_path):
    """An upcycled or converted model written into the save_dir (weights only) is where a
    stage starts (checkpoint.load + finetune), not a run to resume."""
    from megamod.data.tokenizer import load_tokenizer
    from megamod.models.build import build_model
    from megamod.training.checkpoint import save_checkpoint

    with world_of_one() as config:
        model = build_model(config, load_tokenizer("tiny"))
        save_checkpoint(tmp_path, 0, model, None, None, {}, config)
    stage = CheckpointConfig(save_dir=str(tmp_path), load=str(tmp_path), finetune=True)
    assert start_from(stage) == (str(tmp_path), True)

