"""Building a LLaVA model from a config and a tokenizer: the vocabulary's size, the specs
(through `LLaVA`), the frozen parts. Training, conversion, upcycling, generation and
inspection all build their model here, so a checkpoint loads wherever it was written.
"""

from __future__ import annotations

import dataclasses

import torch

from megamod.config import CheckpointConfig, Config, ParallelConfig
from megamod.data.tokenizer import Tokenizer
from megamod.errors import ConfigError
from megamod.models import upstream_fixes
from megamod.models.llava import LLaVA


def padded_vocab_size(tokenizer_size: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's padding: a multiple of divisible_by x TP, so each rank's shard of
    the embedding is equal and aligned."""
    multiple = divisible_by * tp
    return -(-tokenizer_size // multiple) * multiple


def vocab_size(config: Config, tokenizer_size: int) -> int:
    """The embedding's rows: `model.language.vocab_size` when set (a checkpoint's or a
    converted model's), else the tokenizer's size padded for the run's TP size."""
    language = config.model.language
    rows = language.vocab_size or padded_vocab_size(
        tokenizer_size, language.make_vocab_size_divisible_by,
        config.parallel.tensor_model_parallel_size,
    )
    if rows < tokenizer_size:
        raise ConfigError(
            f"model.language.vocab_size={rows} is smaller than the tokenizer's "
            f"{tokenizer_size} tokens: raise it or leave it unset (null: the tokenizer's "
            f"size, padded to a multiple of model.language.make_vocab_size_divisible_by x TP)"
        )
    tp = config.parallel.tensor_model_parallel_size
    if rows % tp:
        raise ConfigError(
            f"model.language.vocab_size={rows} does not split over "
            f"tensor_model_parallel_size={tp} ranks: make it a multiple of {tp} or leave it unset"
        )
    return rows


def with_vocab_size(config: Config, rows: int) -> Config:
    """`config` with `model.language.vocab_size` fixed at `rows`."""
    language = dataclasses.replace(config.model.language, vocab_size=rows)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, language=language))


def one_process_config(saved: Config, tokenizer_size: int) -> Config:
    """`saved` (a checkpoint's config) for a tool's one-process world: no parallelism, no
    outputs, and the vocabulary rows the run had at its own TP size, so its weights load."""
    config = dataclasses.replace(
        saved,
        parallel=ParallelConfig(),
        checkpoint=CheckpointConfig(),
        logging=dataclasses.replace(saved.logging, tensorboard_dir=None),
    )
    return with_vocab_size(config, vocab_size(saved, tokenizer_size))


def model_device() -> torch.device:
    """Where a model built now belongs: this rank's GPU when CUDA is present
    (`megamod.parallel` made it the current device), else the CPU; the meta device while
    torch's default device is meta (`megamod train --dry-run` builds there)."""
    default = torch.get_default_device()
    if default.type == "meta" or not torch.cuda.is_available():
        return default
    return torch.device("cuda", torch.cuda.current_device())


def build_model(config: Config, tokenizer: Tokenizer, device: torch.device | None = None) -> LLaVA:
    """The model `config` describes for `tokenizer`, with `train.trainable`'s parts alone
    trainable, wholly on `device` (default: `model_device()`). Collective-free, but
    megatron-core's parallel state must exist."""
    upstream_fixes.apply()
    model = LLaVA(
        config, vocab_size=vocab_size(config, tokenizer.vocab_size),
        image_token_id=tokenizer.image_token_id,
    )
    model.freeze(config.train.trainable)
    # megatron-core builds its layers on the current GPU, but the ViT's patch conv, class
    # token and position embeddings are plain torch modules, built on the CPU: every tool
    # (not training alone) needs the whole model on one device.
    return model.to(device or model_device())
