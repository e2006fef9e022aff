"""Runs under torchrun (2 processes) for test_hf: the logits of a converted checkpoint at
TP=2, gathered over the vocabulary shards, loaded as `megamod train` loads it.

    tp_worker.py CKPT_DIR INPUTS.pt OUT.pt
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state

from megamod.config import Config, build_dataclass
from megamod.data.tokenizer import load_tokenizer
from megamod.parallel import destroy_distributed, init_distributed
from megamod.training.checkpoint import load_model_weights, saved_config
from megamod.models.build import build_model


def main(ckpt: Path, inputs: Path, out: Path) -> None:
    raw = dataclasses.asdict(saved_config(ckpt))
    raw["parallel"] = {"tensor_model_parallel_size": 2}
    config = build_dataclass(Config, raw, prefix="")
    init_distributed(config.parallel, config.train.seed)
    model = build_model(config, load_tokenizer(config.data.tokenizer))
    load_model_weights(ckpt, model)
    batch = torch.load(inputs)
    with torch.no_grad():
        shard = model.eval()(batch["ids"], batch["pixels"])  # [b, s, v / TP]
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(shard) for _ in range(group.size())]
    torch.distributed.all_gather(parts, shard.contiguous(), group=group)
    if torch.distributed.get_rank() == 0:
        torch.save(torch.cat(parts, dim=-1), out)
    destroy_distributed()


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:4]))
