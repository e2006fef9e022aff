"""Config loading: YAML + dotted overrides, type checks, and the CLI's exit code 2."""

from __future__ import annotations

import sys

import pytest

from megamod.config import Config, load_config
from megamod.errors import ConfigError
from tests.launcher import REPO, TINY_CONFIG, run


def test_tiny_config_with_overrides():
    config = load_config(TINY_CONFIG, ["train.lr=1e-4", "parallel.tensor_model_parallel_size=2",
                                       "parallel.sequence_parallel=true", "train.trainable=[projector]"])
    assert config.train.lr == 1e-4 and isinstance(config.train.lr, float)
    assert config.parallel.tensor_model_parallel_size == 2 and config.parallel.sequence_parallel
    assert config.train.trainable == ["projector"]
    assert config.model.vision.num_patches == 16
    assert config.model.vision.num_built_layers == 2  # feature layer -2 of 3


def test_defaults_are_llava_shapes():
    config = Config()
    assert config.model.vision.num_patches == 576  # CLIP-L/14 at 336 px
    assert config.model.vision.num_built_layers == 23


@pytest.mark.parametrize(
    "overrides, names",
    [
        (["train.lrr=1"], ["train.lrr", "train.lr"]),  # unknown key, with a suggestion
        (["train.lr=fast"], ["train.lr", "float"]),
        (["train.train_iters=1.5"], ["train.train_iters", "int"]),
        (["parallel.sequence_parallel=maybe"], ["parallel.sequence_parallel", "bool"]),
        (["model.language.normalization=BatchNorm"], ["model.language.normalization", "RMSNorm"]),
        (["parallel.tensor_model_parallel_size=3"], ["num_attention_heads", "tensor_model_parallel_size"]),
        (["parallel.sequence_parallel=true"], ["parallel.sequence_parallel", "tensor_model_parallel_size"]),
        (["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
          "model.language.seq_length=127"], ["model.language.seq_length", "tensor_model_parallel_size"]),
        (["model.vision.patch_size=15"], ["model.vision.image_size", "model.vision.patch_size"]),
        (["train.trainable=[vision,decoder]"], ["train.trainable", "decoder"]),
        (["train.global_batch_size=6", "train.micro_batch_size=4"], ["train.global_batch_size"]),
        (["model.language.num_query_groups=3"], ["model.language.num_query_groups"]),
        (["checkpoint.save_dir=null"], ["checkpoint.save_interval", "checkpoint.save_dir"]),
        (["model=3"], ["model", "mapping"]),
        (["train.lr"], ["train.lr", "key.sub=value"]),
    ],
)
def test_bad_config_names_the_key(overrides, names):
    with pytest.raises(ConfigError) as error:
        load_config(TINY_CONFIG, overrides)
    for name in names:
        assert name in str(error.value)


def test_cli_exits_2_naming_the_key(tmp_path):
    cases = {
        "train.lrr=1": "train.lrr",
        "parallel.tensor_model_parallel_size=3": "tensor_model_parallel_size",
        "parallel.sequence_parallel=true": "parallel.sequence_parallel",
    }
    for override, name in cases.items():
        result = run([sys.executable, "-m", "megamod", "train", str(TINY_CONFIG), override], cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert name in result.stderr and "Traceback" not in result.stderr
    missing = run([sys.executable, "-m", "megamod", "train", str(tmp_path / "nope.yaml")], cwd=tmp_path)
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr


def test_cli_exits_2_when_processes_do_not_split(tmp_path):
    """A layout that only the process count rules out fails after launch, still with 2."""
    result = run([sys.executable, "-m", "megamod", "train", str(TINY_CONFIG),
                  "parallel.tensor_model_parallel_size=2"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "tensor_model_parallel_size=2" in result.stderr
