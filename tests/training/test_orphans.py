"""No helper process outlives a killed one: the Manager that megatron-core's checkpoint
writer spawns at the first save, multiprocessing's resource tracker, and the processes it
forks (the writers, during a save) die with the process that saved, `kill -9` included
(megamod.process_hygiene)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psutil

from tests.launcher import env
from tests.training.test_preemption import survivors, wait_for

# One process saving the tiny model as `megamod upcycle` does (a world of one), then
# forking a process as the writers do (they live only during a save), then waiting. Its
# first line counts how often the script runs: spawn would run it again in the Manager.
SAVER = """
open(__file__ + ".runs", "a").write("ran\\n")
import multiprocessing, sys, time
from megamod.data.tokenizer import load_tokenizer
from megamod.models.build import build_model
from megamod.process_hygiene import helpers_die_with_us
from megamod.training.checkpoint import save_checkpoint
from tests.launcher import world_of_one

if __name__ == "__main__":
    helpers_die_with_us()
    with world_of_one() as config:
        save_checkpoint(sys.argv[1], 0, build_model(config, load_tokenizer("tiny")), None, None, {}, config)
        multiprocessing.get_context("fork").Process(target=time.sleep, args=(300,)).start()
        print("saved", flush=True)
        time.sleep(300)
"""


def test_checkpoint_writer_helpers_die_with_a_killed_saver(tmp_path: Path):
    log, script = tmp_path / "saver.log", tmp_path / "saver.py"
    script.write_text(SAVER)
    with open(log, "w") as out:
        saver = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ckpt")],
                                 cwd=tmp_path, env=env(None), stdout=out, stderr=subprocess.STDOUT)
    helpers: list[psutil.Process] = []
    try:
        wait_for(lambda: "saved" in log.read_text() or saver.poll() is not None, "the save")
        assert saver.poll() is None, log.read_text()[-4000:]
        helpers = psutil.Process(saver.pid).children(recursive=True)
        commands = [" ".join(p.cmdline()) for p in helpers]
        assert any("spawn_main" in c for c in commands), commands  # the writer's Manager
        assert any("resource_tracker" in c for c in commands), commands
        assert any(c == " ".join(psutil.Process(saver.pid).cmdline()) for c in commands)  # forked
        # The Manager did not run the script (its imports: megatron-core) again.
        assert Path(f"{script}.runs").read_text() == "ran\n"
        saver.kill()
        saver.wait()
        left = survivors(helpers)
        assert not left, f"alive after kill -9 of the process that saved: {left}"
    finally:
        if saver.poll() is None:
            saver.kill()
            survivors(helpers, timeout=0)


def test_a_child_whose_parent_is_already_gone_ends_itself():
    # die_with_parent given a parent other than its own: the parent it was started by
    # "died" before the prctl, so nothing would ever signal it.
    child = subprocess.run(
        [sys.executable, "-c", "from megamod.process_hygiene import die_with_parent\n"
         "die_with_parent(parent_pid=1)\nprint('lived on')"],
        env=env(None), capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL and "lived on" not in child.stdout
