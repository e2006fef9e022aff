"""slurm/train.sbatch and slurm/moe_llava.sh on a real one-node Slurm cluster
(tests/slurm/cluster.sh), as a user submits them.

A 2-rank job (two pipeline stages) trains and saves, keeping its config and log beside the
checkpoints; a layout the job's ranks cannot take is refused before any rank starts. A job
signalled with SIGUSR1 mid-run (what `--signal=USR1@T` sends before the time limit)
checkpoints, requeues itself, resumes and ends with every step's loss equal to the
uninterrupted job's, each step logged once. The MoE-Tuning chain is submitted as jobs
that depend on each other.

Slurm must be installed (.ci/run installs it, as root): without it these tests fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megamod.config import load_config
from tests.launcher import REPO, TINY_CONFIG, env
from tests.training.test_checkpoint import step_losses

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
TRAIN = REPO / "slurm" / "train.sbatch"
# The test node: 2 CPUs and no GPU (the script's 8-GPU default would be refused).
SMALL_NODE = ["-N1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
ITERS = 6
# The two ranks are two pipeline stages: the stop, requeue and resume run through them.
PIPELINE = ("parallel.pipeline_model_parallel_size=2",)


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a shell whose sbatch reaches a fresh cluster; jobs inherit it,
    this Python's environment included."""
    if shutil.which("slurmctld") is None or shutil.which("sbatch") is None:
        pytest.fail("Slurm is not installed: apt-get install -y slurmctld slurmd slurm-client "
                    "munge (as root; .ci/run does)")
    cluster = tmp_path_factory.mktemp("cluster")
    started = subprocess.run(["bash", str(CLUSTER), "start", str(cluster)],
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    yield env({"SLURM_CONF": str(cluster / "slurm.conf"), "PATH": path})
    subprocess.run(["bash", str(CLUSTER), "stop", str(cluster)], capture_output=True, timeout=60)


def sbatch_train(root: Path, *options: str, layout: tuple[str, ...] = PIPELINE) -> list[str]:
    return ["sbatch", *SMALL_NODE, f"--output={root}/job-%j.out", *options, str(TRAIN),
            str(TINY_CONFIG), f"train.train_iters={ITERS}", "checkpoint.save_interval=null",
            f"checkpoint.save_dir={root}/ckpt", f"logging.tensorboard_dir={root}/tb", *layout]


def job_output(root: Path) -> str:
    return "".join(p.read_text() for p in root.glob("job-*.out"))


def iterations(output: str) -> list[int]:
    """The steps logged, in order, repeats included."""
    return [json.loads(line)["iteration"] for line in output.splitlines()
            if line.startswith('{"iteration"')]


def tensorboard_losses(tb_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert len({e.step for e in scalars}) == len(scalars), "a step shows twice"
    return {e.step: e.value for e in scalars}


@pytest.fixture(scope="module")
def uninterrupted(slurm_env, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    result = subprocess.run(sbatch_train(root, "--wait"), cwd=root, env=slurm_env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, job_output(root)[-6000:] + result.stderr
    return root


def test_job_trains_on_every_rank_and_keeps_its_record_beside_the_checkpoints(uninterrupted):
    out = job_output(uninterrupted)
    start = json.loads(next(line for line in out.splitlines() if line.startswith('{"event"')))
    # The ranks came from SLURM_PROCID / SLURM_NTASKS: one per pipeline stage.
    assert (start["pipeline_model_parallel_size"], start["data_parallel_size"]) == (2, 1)
    ckpt = uninterrupted / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)
    assert (ckpt / f"iter_{ITERS:07d}" / "metadata.json").is_file()
    assert iterations(out) == list(range(1, ITERS + 1))
    assert tensorboard_losses(uninterrupted / "tb") == pytest.approx(step_losses(out), rel=1e-5)

    job_id = re.search(r"megamod: job (\d+)", out).group(1)
    assert step_losses((ckpt / "logs" / f"{job_id}.out").read_text()) == step_losses(out)
    saved = load_config(ckpt / "logs" / f"{job_id}-config.yaml", [])
    assert saved.checkpoint.save_dir == str(ckpt) and saved.train.train_iters == ITERS
    assert (ckpt / "megamod.lock").read_text() == ""  # released at the end


def test_signalled_job_checkpoints_requeues_and_resumes_to_the_same_losses(
    slurm_env, uninterrupted, tmp_path
):
    job = subprocess.Popen(sbatch_train(tmp_path, "--wait"), cwd=tmp_path, env=slurm_env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while '"event": "start"' not in job_output(tmp_path):
        assert job.poll() is None and time.time() < deadline, job_output(tmp_path)[-6000:]
        time.sleep(0.05)
    job_id = re.search(r"megamod: job (\d+)", job_output(tmp_path)).group(1)
    # Like --signal=USR1@T: to the job's steps (the ranks), not to the batch shell.
    subprocess.run(["scancel", "--signal=USR1", job_id], env=slurm_env, check=True)
    assert job.wait(timeout=300) == 0, job_output(tmp_path)[-6000:] + job.stdout.read()

    out = job_output(tmp_path)
    stopped = int(re.search(r"stopped after iteration (\d+) on SIGUSR1", out).group(1))
    assert stopped < ITERS
    assert f"requeueing job {job_id}" in out and "restart 1" in out
    assert f"resumed from {tmp_path / 'ckpt'} at iteration {stopped}" in out
    assert iterations(out) == list(range(1, ITERS + 1)), "a step was lost or repeated"
    assert tensorboard_losses(tmp_path / "tb") == pytest.approx(
        tensorboard_losses(uninterrupted / "tb"), abs=1e-6)
    # The console's 6 significant digits, as a user would compare them.
    assert step_losses(out) == step_losses(job_output(uninterrupted))


def test_a_layout_the_ranks_cannot_take_is_refused_before_any_rank_starts(slurm_env, tmp_path):
    result = subprocess.run(
        sbatch_train(tmp_path, "--wait", layout=("parallel.pipeline_model_parallel_size=4",)),
        cwd=tmp_path, env=slurm_env, capture_output=True, text=True, timeout=120)
    out = job_output(tmp_path)
    assert result.returncode == 2, out + result.stderr
    assert "2 processes cannot be split" in out and "pipeline_model_parallel_size=4" in out
    assert '"event": "start"' not in out and "megamod: job" not in out


def test_moe_llava_stages_are_one_dependency_chain(slurm_env, tmp_path):
    result = subprocess.run(
        ["bash", str(REPO / "slurm" / "moe_llava.sh"), "--root", str(tmp_path), "--hold",
         *SMALL_NODE, "--", "train.train_iters=3"],
        cwd=tmp_path, env=slurm_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    ids = dict(re.findall(r"^(stage \d|upcycle): job (\d+)", result.stdout, re.MULTILINE))
    assert set(ids) == {"stage 1", "stage 2", "upcycle", "stage 3"}

    def scontrol(*args: str) -> str:
        return subprocess.run(["scontrol", *args], env=slurm_env, capture_output=True,
                              text=True, check=True).stdout

    try:
        jobs = {name: scontrol("show", "job", job_id) for name, job_id in ids.items()}
        upcycle_script = scontrol("write", "batch_script", ids["upcycle"], "-")
    finally:
        subprocess.run(["scancel", *ids.values()], env=slurm_env, check=True)
    assert "Dependency=(null)" in jobs["stage 1"]
    for job, previous in [("stage 2", "stage 1"), ("upcycle", "stage 2"), ("stage 3", "upcycle")]:
        assert f"Dependency=afterok:{ids[previous]}(" in jobs[job]
    for n in (1, 2, 3):
        assert f"stage{n}.yaml checkpoint.save_dir={tmp_path}/stage{n}/checkpoints" in jobs[f"stage {n}"]
        assert "train.train_iters=3" in jobs[f"stage {n}"]
    assert f"checkpoint.load={tmp_path}/stage1/checkpoints checkpoint.finetune=true" in jobs["stage 2"]
    assert f"checkpoint.load={tmp_path}/upcycled checkpoint.finetune=true" in jobs["stage 3"]
    assert (f"megamod upcycle --input {tmp_path}/stage2/checkpoints --output {tmp_path}/upcycled "
            f"--num-experts 4 --layer-freq 2") in upcycle_script
