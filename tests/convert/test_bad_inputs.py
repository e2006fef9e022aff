"""`megamod convert` of damaged Hugging Face weights: exit 2 naming the file, nothing written.

A tiny random LLaVA saved here (as tests/convert/test_hf.py builds it) is copied per
damage: its model.safetensors truncated or replaced by garbage, a sharded checkpoint's
index garbled, a PyTorch .bin garbled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

from tests.convert.test_hf import convert, hf_dir  # noqa: F401  (hf_dir: a fixture)


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(os.urandom(4096))
    return path


def _emptied(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _sharded_index_garbled(folder: Path) -> Path:
    """A sharded checkpoint (model.safetensors.index.json + its shard) whose index is cut."""
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "model-00001-of-00001.safetensors"}})[:20])
    return index


def _bin_garbled(folder: Path) -> Path:
    (folder / "model.safetensors").unlink()
    return _garbage(folder / "pytorch_model.bin")


# damage to a copy of the HF folder -> the file it damaged
DAMAGE: dict[str, Callable[[Path], Path]] = {
    "truncated safetensors": lambda d: _truncate(d / "model.safetensors"),
    "garbage safetensors": lambda d: _garbage(d / "model.safetensors"),
    "empty safetensors": lambda d: _emptied(d / "model.safetensors"),
    "garbled shard index": _sharded_index_garbled,
    "garbled pytorch_model.bin": _bin_garbled,
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_weights_exit_2_naming_the_file(hf_dir, tmp_path, capsys, damage):
    source = shutil.copytree(hf_dir, tmp_path / "llava")
    damaged = damage(source)
    out = tmp_path / "out"
    assert convert("--from", "hf", "--input", source, "--output", out) == 2
    err = capsys.readouterr().err
    assert f"error: {damaged} is damaged" in err and "copy it again" in err, err
    assert sorted(tmp_path.iterdir()) == [source]  # no output, no staging folder
