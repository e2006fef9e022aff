"""Damaged checkpoints end in exit 2 naming the file and the way on, in every tool.

One 2-step training run saves iterations 1 and 2; each damage is done to a copy of its
save_dir. Every tool reads a checkpoint through `checkpoint.saved_config` first, so each
kind of damage is checked there in this process, and one kind (a truncated `common.pt`)
through each command as a user types it: `train` in its own process, `inspect`,
`upcycle` and `generate` through their entry points here (they fail before building a
model).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Callable

import pytest

from megamod.config import CheckpointConfig
from megamod.errors import CheckpointError
from megamod.training import checkpoint
from tests.launcher import TINY_CONFIG, free_port, run

TRACKER = "latest_checkpointed_iteration.txt"


@pytest.fixture(scope="module")
def save_dir(tiny_checkpoint) -> Path:
    """tests/conftest.py's tiny run: damaged only in copies."""
    assert checkpoint.saved_iterations(tiny_checkpoint) == [1, 2]
    return tiny_checkpoint


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


LATEST = "iter_0000002"
# (damage to a copy of the save_dir, words of the error, the iterations it offers instead)
DAMAGE: list[tuple[str, Callable[[Path], None], str, str]] = [
    ("truncated common.pt", lambda d: _truncate(d / LATEST / "common.pt"),
     f"{LATEST} is damaged: common.pt cannot be read (truncated?", "another iteration there (1)"),
    ("garbage tracker", lambda d: (d / TRACKER).write_text("latest\n"),
     f"{TRACKER} is damaged: it should hold the number of the latest iteration but holds 'latest'",
     "an iteration there (1, 2)"),
    ("non-ASCII tracker", lambda d: (d / TRACKER).write_bytes("²\n".encode()),
     f"{TRACKER} is damaged: it should hold the number", "an iteration there (1, 2)"),
    ("tracker names a missing iteration", lambda d: (d / TRACKER).write_text("7\n"),
     f"{TRACKER} names iteration 7 but", "another iteration there (1, 2)"),
    ("garbage metadata.json", lambda d: (d / LATEST / "metadata.json").write_bytes(b"\x00\xff"),
     f"{LATEST} is damaged: metadata.json is not valid JSON", "another iteration there (1)"),
    ("foreign metadata.json", lambda d: (d / LATEST / "metadata.json").write_text('{"a": 1}'),
     f"{LATEST} is damaged: metadata.json does not name a checkpoint format",
     "another iteration there (1)"),
]


def damaged_copy(save_dir: Path, tmp_path: Path, damage: Callable[[Path], None]) -> Path:
    copy = shutil.copytree(save_dir, tmp_path / "ckpt", ignore=shutil.ignore_patterns("megamod.lock"))
    damage(copy)
    return copy


@pytest.mark.parametrize("damage, words, instead", [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_each_damage_names_the_file_and_the_iterations_to_resume_from(
    save_dir, tmp_path, damage, words, instead
):
    copy = damaged_copy(save_dir, tmp_path, damage)
    with pytest.raises(CheckpointError) as error:
        checkpoint.saved_config(copy)
    message = str(error.value)
    assert words in message and f"{instead}: write its number into {copy / TRACKER}" in message
    # A resume reports it rather than starting over (and later overwriting iter_*).
    assert checkpoint.start_from(CheckpointConfig(save_dir=str(copy))) == (str(copy), False)


def _only_latest_truncated(save_dir: Path) -> None:
    shutil.rmtree(save_dir / "iter_0000001")
    _truncate(save_dir / LATEST / "common.pt")


def test_a_lone_damaged_iteration_says_how_to_start_afresh(save_dir, tmp_path):
    copy = damaged_copy(save_dir, tmp_path, _only_latest_truncated)
    with pytest.raises(CheckpointError, match=(
            f"holds no other iteration: delete {copy / LATEST} and {copy / TRACKER} to start afresh")):
        checkpoint.saved_config(copy)


def test_every_command_exits_2_on_a_truncated_common_pt(save_dir, tmp_path, capsys):
    from megamod.__main__ import main

    copy = damaged_copy(save_dir, tmp_path, DAMAGE[0][1])
    words = f"{copy / LATEST} is damaged: common.pt cannot be read"
    image = tmp_path / "image.png"
    image.write_bytes(b"not read: the checkpoint fails first")
    commands = {
        "inspect": ["inspect", str(copy)],
        "upcycle": ["upcycle", "--input", str(copy), "--output", str(tmp_path / "moe"),
                    "--num-experts", "4", "--layer-freq", "2"],
        "generate": ["generate", "--checkpoint", str(copy), "--image", str(image), "--prompt", "hi"],
    }
    for name, argv in commands.items():
        assert main(argv) == 2, name
        assert words in capsys.readouterr().err, name
    trained = run([sys.executable, "-m", "megamod", "train", str(TINY_CONFIG), "train.train_iters=3",
                   f"checkpoint.save_dir={copy}", "logging.tensorboard_dir=null"],
                  cwd=tmp_path, extra_env={"MASTER_PORT": str(free_port())})
    assert trained.returncode == 2, trained.stderr[-3000:]
    assert words in trained.stderr and "Traceback" not in trained.stderr
    assert checkpoint.saved_iterations(copy) == [1, 2]  # nothing written over
