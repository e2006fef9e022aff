"""The one way tests start processes: torchrun, plain ranks (`launch`, one script or several:
`launch_scripts`), the CLI, or several CLI commands in one process (`megamod_commands`),
with a timeout and the log kept.

A launch costs ~10 s of imports on 2 cores, so each launch runs many checks.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from megamod.parallel import free_port

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "examples" / "configs" / "tiny.yaml"


def env(extra: dict[str, str] | None) -> dict[str, str]:
    result = dict(os.environ)
    # A rendezvous this test process set up for itself is not the child's.
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        result.pop(key, None)
    result["PYTHONPATH"] = f"{REPO}{os.pathsep}{result.get('PYTHONPATH', '')}"
    result.setdefault("OMP_NUM_THREADS", "1")
    result["PYTHONWARNINGS"] = "ignore"
    result.update(extra or {})
    return result


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    # --standalone: a private rendezvous on a free port, so launches never collide.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *args]


def run(
    cmd: list[str], cwd: Path, timeout: float = 300, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a command; on failure the assertion message carries the end of its output."""
    return subprocess.run(
        cmd, cwd=cwd, env=env(extra_env), capture_output=True, text=True, timeout=timeout
    )


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (
        f"{' '.join(map(str, result.args))} exited {result.returncode}\n"
        f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}"
    )
    return result


def torchrun(nproc: int, args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return check(run(torchrun_command(nproc, args), cwd, timeout))


def launch(nproc: int, args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python ARGS` as `nproc` ranks of one job, each given the environment torchrun gives
    its workers: for test workers, which need no elastic agent, without torchrun's start-up
    and shutdown (~5 s a launch on 2 cores). The first rank to fail stops the others. The
    result holds every rank's output, rank by rank, and the first failure's exit code."""
    port = str(free_port())
    outputs, ranks = [], []
    try:
        for rank in range(nproc):
            outputs.append((tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")))
            rank_env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                        "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
            ranks.append(subprocess.Popen([sys.executable, *args], cwd=cwd, env=env(rank_env),
                                          stdout=outputs[-1][0], stderr=outputs[-1][1], text=True))
        deadline = time.monotonic() + timeout
        failed = None
        while failed is None and None in (codes := [p.poll() for p in ranks]):
            failed = next((code for code in codes if code not in (None, 0)), None)
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired([sys.executable, *args], timeout)
            time.sleep(0.05)
        failed = failed or next((p.returncode for p in ranks if p.returncode), 0)
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
            p.wait()
    text = []
    for out, err in outputs:
        out.seek(0), err.seek(0)
        text.append((out.read(), err.read()))
        out.close(), err.close()
    return check(subprocess.CompletedProcess(
        [sys.executable, *args], failed, "".join(o for o, _ in text), "".join(e for _, e in text)))


def launch_scripts(
    nproc: int, scripts: list[list[object]], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Several worker scripts, each `[SCRIPT, ARG...]`, as ONE `launch` of `nproc` ranks: each
    rank runs them one after another as `__main__` (tests/run_scripts.py), paying one start
    for all of them."""
    import json

    jobs = [json.dumps([str(a) for a in script]) for script in scripts]
    return launch(nproc, [str(REPO / "tests" / "run_scripts.py"), *jobs], cwd, timeout)


def megamod_train(
    nproc: int, overrides: list[str], cwd: Path, timeout: float = 300, config: Path = TINY_CONFIG
) -> subprocess.CompletedProcess:
    """`megamod train CONFIG overrides...` as a user runs it: one process on its own,
    several under torchrun."""
    args = ["-m", "megamod", "train", str(config), *overrides]
    if nproc == 1:
        return check(run([sys.executable, *args], cwd, timeout))
    return torchrun(nproc, args, cwd, timeout)


def megamod_commands(
    commands: list[list[object]], cwd: Path, timeout: float = 300
) -> list[subprocess.CompletedProcess]:
    """Several one-process `megamod ...` commands (argv without `megamod`) run one after
    another in ONE process (tests/megamod_commands.py: `megamod.__main__.main(argv)` each),
    for checks of what commands print, write and exit with, not of their process (signals,
    launchers): one start (~9 s of imports) for them all. Each result has the command's exit code
    and output; a command that crashes ends the process and fails the check."""
    import json

    with tempfile.TemporaryDirectory() as scratch:
        commands_file, results_file = Path(scratch) / "commands.json", Path(scratch) / "results.json"
        commands_file.write_text(json.dumps([[str(a) for a in argv] for argv in commands]))
        check(run([sys.executable, str(REPO / "tests" / "megamod_commands.py"), str(commands_file),
                   str(results_file)], cwd, timeout))
        results = json.loads(results_file.read_text())
    return [subprocess.CompletedProcess(["megamod", *map(str, argv)], r["returncode"], r["stdout"], r["stderr"])
            for argv, r in zip(commands, results)]


def parallel_worker_results(worker: Path, variants: tuple[str, ...], out: Path) -> dict:
    """A parallel worker's protocol: `init` (the references, one process), then `grads`
    (two processes), each launch running every variant; returns the `grads_*.pt` files
    they wrote, by name."""
    import torch

    launch(1, [str(worker), "init", str(out), *variants], cwd=out, timeout=600)
    launch(2, [str(worker), "grads", str(out), *variants], cwd=out, timeout=600)
    return {p.stem: torch.load(p) for p in out.glob("grads_*.pt")}


@contextlib.contextmanager
def world_of_one(overrides: list[str] = ()) -> Iterator:
    """This pytest process as a one-rank job (gloo, megatron-core's parallel state built
    from the tiny config + overrides); yields that config."""
    from megamod.config import load_config
    from megamod import parallel

    config = load_config(TINY_CONFIG, list(overrides))
    with parallel.world_of_one(config.parallel, config.train.seed, "tests"):
        yield config
