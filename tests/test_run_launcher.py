"""`megamod run`: torchrun for a training job, whose exit code is the job's.

One chain of launches with 2 processes (TP=2 + SP), all the same command: A is stopped by
SIGUSR1 to the launcher, B resumes from A's checkpoint and is stopped by SIGTERM, C resumes
from B's and finishes. One launch whose workers refuse an input (exit 2). The refusals the
launcher makes before any worker starts, and the signal relay, run in this process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from megamod.cli.run import RELAYED_SIGNALS, SignalRelay, argument_parser, check_job, job_exit_code
from megamod.errors import ConfigError
from megamod.training.preemption import EXIT_RESUMABLE
from tests.launcher import TINY_CONFIG, env, run
from tests.training.test_checkpoint import step_losses
from tests.training.test_preemption import wait_for

TRACKER = "latest_checkpointed_iteration.txt"


def run_command(root: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "megamod", "run", "--nproc-per-node", "2", "train",
            str(TINY_CONFIG), "parallel.tensor_model_parallel_size=2",
            "parallel.sequence_parallel=true", "train.train_iters=12",
            "checkpoint.save_interval=100", f"checkpoint.save_dir={root}/ckpt",
            f"logging.tensorboard_dir={root}/tb", *overrides]


def launch_and_signal(root: Path, name: str, sig: signal.Signals | None, after_step: int) -> dict:
    """The run command; `sig` to the launcher once rank 0 has logged `after_step`."""
    log = root / f"{name}.log"
    with open(log, "w") as out:
        launcher = subprocess.Popen(run_command(root), cwd=root, env=env({"PYTHONUNBUFFERED": "1"}),
                                    stdout=out, stderr=subprocess.STDOUT)
    try:
        if sig is not None:
            wait_for(lambda: after_step in step_losses(log.read_text()) or launcher.poll() is not None,
                     f"step {after_step} of launch {name}", timeout=300)
            launcher.send_signal(sig)
        code = launcher.wait(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    return {"code": code, "log": log.read_text(),
            "latest": int((root / "ckpt" / TRACKER).read_text()) if (root / "ckpt" / TRACKER).exists() else None}


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("run_chain")
    a = launch_and_signal(root, "a", signal.SIGUSR1, after_step=2)
    b = launch_and_signal(root, "b", signal.SIGTERM, after_step=(a["latest"] or 0) + 1)
    c = launch_and_signal(root, "c", None, after_step=0)
    return {"root": root, "a": a, "b": b, "c": c}


def test_sigusr1_to_the_launcher_ends_in_75_with_a_checkpoint(chain):
    a = chain["a"]
    assert a["code"] == EXIT_RESUMABLE, a["log"][-4000:]
    assert a["latest"] is not None and a["latest"] >= 2
    assert f"stopped after iteration {a['latest']} on SIGUSR1" in a["log"]
    assert max(step_losses(a["log"])) == a["latest"]


def test_sigterm_to_the_launcher_ends_in_75_after_resuming(chain):
    a, b = chain["a"], chain["b"]
    assert b["code"] == EXIT_RESUMABLE, b["log"][-4000:]
    assert f"resumed from {chain['root'] / 'ckpt'} at iteration {a['latest']}" in b["log"]
    assert min(step_losses(b["log"])) == a["latest"] + 1
    assert b["latest"] > a["latest"]
    assert f"stopped after iteration {b['latest']} on SIGTERM" in b["log"]


def test_the_same_command_finishes_from_the_last_checkpoint(chain):
    b, c = chain["b"], chain["c"]
    assert c["code"] == 0, c["log"][-4000:]
    assert f"resumed from {chain['root'] / 'ckpt'} at iteration {b['latest']}" in c["log"]
    assert sorted(step_losses(c["log"])) == list(range(b["latest"] + 1, 13))
    assert c["latest"] == 12
    assert not any("Traceback" in chain[name]["log"] for name in "abc")


def test_workers_refusing_an_input_end_the_job_with_2_and_their_message(tmp_path):
    result = run(run_command(tmp_path, f"data.tokenizer={tmp_path}/missing"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-4000:]
    assert "error:" in result.stderr and f"{tmp_path}/missing" in result.stderr
    # Both ranks refuse; the first to exit is reported, the other may be stopped first.
    assert re.search(r"megamod run: .*rank [01] exited 2", result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr


def test_refusals_before_any_worker_starts():
    def check(*argv: str) -> None:
        parser = argument_parser()
        check_job(parser, parser.parse_args(list(argv)))

    # The case: TP=3 on 2 ranks (refused by the config itself).
    with pytest.raises(ConfigError, match="tensor_model_parallel_size=3"):
        check("--nproc-per-node", "2", "train", str(TINY_CONFIG),
              "parallel.tensor_model_parallel_size=3")
    # A global batch 2 ranks cannot split: known only with the world size.
    with pytest.raises(ConfigError, match="data-parallel size 2"):
        check("--nproc-per-node", "2", "train", str(TINY_CONFIG), "train.global_batch_size=4")
    check("--nproc-per-node", "1", "train", str(TINY_CONFIG), "train.global_batch_size=4")
    for argv in (["--nproc-per-node", "2", "upcycle"],
                 ["--nproc-per-node", "2", "train", str(TINY_CONFIG), "--dry-run"],
                 ["--max-restarts", "1", "train", str(TINY_CONFIG)]):
        with pytest.raises(SystemExit) as refused:
            check(*argv)
        assert refused.value.code == 2


def test_job_exit_code():
    assert job_exit_code([75, -15]) == EXIT_RESUMABLE  # a rank stopped by torchrun as it exits
    assert job_exit_code([75, 75]) == EXIT_RESUMABLE
    assert job_exit_code([2, -15]) == 2
    assert job_exit_code([1, 2]) == 2
    assert job_exit_code([1, -15]) == 1
    assert job_exit_code([-10]) == 1


def test_relay_sends_stop_signals_to_the_workers_and_a_second_ctrl_c_aborts():
    # A stand-in worker that reports each signal it gets.
    worker = subprocess.Popen(
        [sys.executable, "-c",
         "import signal, sys, time\n"
         "for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):\n"
         "    signal.signal(s, lambda n, f: print(signal.Signals(n).name, flush=True))\n"
         "print('ready', flush=True)\n"
         "time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True)
    previous = {sig: signal.getsignal(sig) for sig in RELAYED_SIGNALS}
    try:
        assert worker.stdout.readline() == "ready\n"
        # Only the stand-in: this process's other children (the checkpoint writer's Manager
        # of an earlier test) must not get the signals.
        SignalRelay(workers=lambda: [psutil.Process(worker.pid)])
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            os.kill(os.getpid(), sig)
            assert worker.stdout.readline() == f"{sig.name}\n"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert worker.stdout.readline() == "SIGINT\n"  # relayed before aborting
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        worker.kill()
        worker.wait()
