"""Session fixtures shared by the test packages.

- `llama_sp_tokenizer`: a Llama/Vicuna-style SentencePiece tokenizer folder
  (`tokenizer.model` + `tokenizer_config.json`, no `tokenizer.json`), trained offline by
  `tests/sp_tokenizer.py`; give its path to `load_tokenizer` or a config's `data.tokenizer`.
- `tiny_checkpoint`: a `checkpoint.save_dir` of the tiny dense model trained 2 steps in one
  process (`megamod train`), saved after each (iterations 1 and 2); shared by
  tests/training/test_damaged_checkpoint.py and tests/eval/test_command.py, which copy it
  before they change or add anything.
- `tiny_tp2_sp_checkpoint`: a `checkpoint.save_dir` of the tiny dense model trained 2 steps
  at TP=2 + SP (`megamod train` under torchrun), saved once at the end; shared by
  tests/test_inspect.py and tests/moe/test_upcycle.py, which only read it.
- `official_llava`: a folder holding the official LLaVA package (llava-torch==1.2.2.post1)
  and the transformers/tokenizers/sentencepiece it pins, installed once with pip into
  ~/.cache/megamod-tests (override with MEGAMOD_LLAVA_REF_DIR). It is not importable here
  (megamod needs a later transformers): tests run it in a subprocess with PYTHONPATH set to
  the folder (see tests/data/test_official_llava.py). Skips when pip cannot reach PyPI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.launcher import megamod_train
from tests.sp_tokenizer import build_llama_sp_tokenizer

# llava-torch 1.2.2.post1 pins transformers==4.36.2, tokenizers==0.15.0, sentencepiece==0.1.99;
# transformers 4.36.2 needs huggingface_hub<1.0, which imports requests.
OFFICIAL_LLAVA_REQUIREMENTS = (
    "llava-torch==1.2.2.post1",
    "transformers==4.36.2",
    "tokenizers==0.15.0",
    "sentencepiece==0.1.99",
    "huggingface_hub==0.20.3",
    "requests==2.32.3",
    "urllib3==2.2.3",
    "idna==3.10",
    "charset-normalizer==3.4.0",
    "certifi==2024.8.30",
)


@pytest.fixture(scope="session")
def llama_sp_tokenizer(tmp_path_factory) -> Path:
    """A Vicuna-style SentencePiece tokenizer folder (see tests/sp_tokenizer.py)."""
    return build_llama_sp_tokenizer(tmp_path_factory.mktemp("llama_sp_tokenizer"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny dense model's save_dir after 2 steps, saved at 1 and 2 (copy it to change it)."""
    root = tmp_path_factory.mktemp("tiny")
    megamod_train(1, ["train.train_iters=2", "checkpoint.save_interval=1",
                      f"checkpoint.save_dir={root}/ckpt", "logging.tensorboard_dir=null"], cwd=root)
    return root / "ckpt"


@pytest.fixture(scope="session")
def tiny_tp2_sp_checkpoint(tmp_path_factory) -> Path:
    """The tiny dense model's save_dir after 2 steps at TP=2 + SP (read it, never write it)."""
    root = tmp_path_factory.mktemp("tiny_tp2_sp")
    megamod_train(2, ["train.train_iters=2", "parallel.tensor_model_parallel_size=2",
                      "parallel.sequence_parallel=true", "checkpoint.save_interval=null",
                      "logging.tensorboard_dir=null", f"checkpoint.save_dir={root}/ckpt"], cwd=root)
    return root / "ckpt"


def _official_llava_dir() -> Path:
    default = Path.home() / ".cache" / "megamod-tests" / "llava-torch-1.2.2.post1"
    return Path(os.environ.get("MEGAMOD_LLAVA_REF_DIR", default))


@pytest.fixture(scope="session")
def official_llava() -> Path:
    """The folder to put first on a subprocess's PYTHONPATH to run the official LLaVA code."""
    target = _official_llava_dir()
    marker = target / ".complete"
    if not marker.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            result = subprocess.run(
                [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                 "--target", str(staging), *OFFICIAL_LLAVA_REQUIREMENTS],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            if result.returncode != 0:
                pytest.skip(f"cannot install the official LLaVA package with pip: {result.stderr.strip()[-500:]}")
            (staging / ".complete").write_text("\n".join(OFFICIAL_LLAVA_REQUIREMENTS) + "\n")
            shutil.rmtree(target, ignore_errors=True)
            try:
                staging.rename(target)
            except OSError:  # another session installed it meanwhile
                if not marker.is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
