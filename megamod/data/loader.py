"""Micro-batches for the training loop: the loader interface and its in-memory version.

`TrainLoader.next_step()` returns this data-parallel rank's micro-batches for one
optimizer step; `state_dict()` is the exact data position, saved in checkpoints.
Ordering: the global sample stream is a fresh permutation of the data set per epoch
(seeded by `data.seed` and the epoch); a step consumes the next `global_batch_size`
samples of it, DP rank r taking the r-th contiguous slice. TP ranks of one DP group
build identical batches (same stream, same slice), so nothing needs broadcasting.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from megamod.config import Config
from megamod.data.conversation import IGNORE_INDEX, encode_conversation
from megamod.data.preprocess import preprocess_image
from megamod.data.tokenizer import Tokenizer
from megamod.errors import DataError


@dataclass
class Sample:
    """One tokenised sample with its preprocessed images."""

    tokens: np.ndarray  # int64 [seq_length]
    labels: np.ndarray  # int64 [seq_length], shifted, IGNORE_INDEX where no loss
    images: np.ndarray  # float32 [num_images, 3, H, W]


def collate(samples: list[Sample]) -> dict[str, torch.Tensor]:
    labels = torch.from_numpy(np.stack([s.labels for s in samples]))
    return {
        "tokens": torch.from_numpy(np.stack([s.tokens for s in samples])),
        "labels": labels,
        "loss_mask": labels != IGNORE_INDEX,
        "images": torch.from_numpy(np.concatenate([s.images for s in samples])),
    }


class TrainLoader:
    """Resumable, DP-sharded micro-batches over an indexable list of samples."""

    def __init__(
        self,
        samples: list[Sample],
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
    ) -> None:
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError("global batch must split into micro-batches on every DP rank")
        self.samples = samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.consumed_samples = 0

    def _sample_at(self, position: int) -> Sample:
        epoch, offset = divmod(position, len(self.samples))
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.samples))
        return self.samples[order[offset]]

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        per_rank = self.global_batch_size // self.dp_size
        start = self.consumed_samples + self.dp_rank * per_rank
        mine = [self._sample_at(start + i) for i in range(per_rank)]
        self.consumed_samples += self.global_batch_size
        mbs = self.micro_batch_size
        return [collate(mine[i : i + mbs]) for i in range(0, per_rank, mbs)]

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed_samples = int(state["consumed_samples"])


def load_llava_json_samples(
    json_path: Path, image_folder: Path, config: Config, tokenizer: Tokenizer
) -> list[Sample]:
    """Tokenise and preprocess every sample of a (small) LLaVA JSON file in memory."""
    try:
        records = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read LLaVA annotations {json_path}: {e}") from None
    vision, language = config.model.vision, config.model.language
    samples = []
    for record in records:
        image_names = record.get("image") or []
        if isinstance(image_names, str):
            image_names = [image_names]
        encoded = encode_conversation(
            record["conversations"],
            config.data.conversation_template,
            tokenizer,
            num_image_tokens=vision.num_patches,
            seq_length=language.seq_length,
        )
        images = [
            preprocess_image(
                Image.open(image_folder / name), vision.image_size, config.data.image_aspect_ratio
            )
            for name in image_names[: encoded.num_images]
        ]
        pixels = (
            np.stack(images)
            if images
            else np.zeros((0, 3, vision.image_size, vision.image_size), np.float32)
        )
        samples.append(Sample(encoded.tokens, encoded.labels, pixels))
    if not samples:
        raise DataError(f"{json_path} holds no samples")
    return samples
