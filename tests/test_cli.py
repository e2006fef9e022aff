"""The `megamod` command's dispatch, as a user types it."""

from __future__ import annotations

import json
import sys

import pytest

from tests.data.fixtures import make_llava
from tests.launcher import run


def test_build_shards_through_python_m_megamod(tmp_path):
    fixture = make_llava(tmp_path / "src")
    out = tmp_path / "shards"
    result = run([sys.executable, "-m", "megamod", "build-shards", "--format", "llava",
                  "--annotations", str(fixture.annotations), "--images", str(fixture.images),
                  "--output", str(out), "--workers", "0"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == len(fixture.expected)
    assert manifest["skipped"] == fixture.skipped


def test_unreadable_annotations_exit_2_naming_the_file(tmp_path):
    missing = tmp_path / "blip_laion_cc_sbu_558k.json"
    result = run([sys.executable, "-m", "megamod", "build-shards", "--format", "llava",
                  "--annotations", str(missing), "--images", str(tmp_path),
                  "--output", str(tmp_path / "out")], cwd=tmp_path)
    assert result.returncode == 2 and missing.name in result.stderr


def test_unknown_command_exits_2_with_usage(tmp_path):
    result = run([sys.executable, "-m", "megamod", "fly"], cwd=tmp_path)
    assert result.returncode == 2 and "usage: megamod" in result.stderr


def test_train_help_lists_the_sections_and_exits_0(tmp_path):
    from megamod.__main__ import main

    assert main(["train", "--help"]) == 0
    result = run([sys.executable, "-m", "megamod", "train", "-h"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for section in ("model", "moe", "mod", "parallel", "data", "train", "precision", "checkpoint"):
        assert section in result.stdout
    assert "--dry-run" in result.stdout
    assert run([sys.executable, "-m", "megamod", "train"], cwd=tmp_path).returncode == 2


@pytest.mark.parametrize("key, path", [
    ("checkpoint.save_dir", "{file}/checkpoints"),  # under a file
    ("logging.tensorboard_dir", "/proc/megamod-tensorboard"),  # where nothing can be made
    ("checkpoint.save_dir", "/proc/self"),  # a folder, but nothing can be written to it
])
def test_an_unusable_output_folder_is_refused_before_any_process_group(
    tmp_path, capsys, monkeypatch, key, path
):
    import megamod.parallel
    from megamod.__main__ import main
    from tests.launcher import TINY_CONFIG

    def no_process_group(*args, **kwargs):
        raise AssertionError("a process group was started")

    monkeypatch.setattr(megamod.parallel, "init_distributed", no_process_group)
    monkeypatch.chdir(tmp_path)  # the config's other output folder is relative
    (tmp_path / "file").write_text("mine")
    path = path.format(file=tmp_path / "file")
    assert main(["train", str(TINY_CONFIG), f"{key}={path}"]) == 2
    assert f"error: {key}={path} " in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"
