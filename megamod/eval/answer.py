"""Answering a benchmark's questions with a checkpoint, in one process or split over the
data-parallel ranks of a `torchrun` / `srun` job, with the same answers either way.

Every rank holds the whole model (TP=1; DP = the world size). The questions are planned
into batches once, identically on every rank (prompts of one token length per batch, as
one process batches them), and rank r answers batches r, r + N, ...; the answers are
gathered into question order. Identical batches make identical arithmetic, and each batch
reseeds megatron-core's RNG streams from its own number: MoE-LLaVA's gate draws Gumbel
noise at evaluation too (`megamod.moe.deepspeed_gate`), so without it a question's answer
would depend on which batches its rank had answered before.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from megamod.errors import DataError
from megamod.eval.question_set import QuestionSet
from megamod.inference.generate import Generator, open_generator, prompt_tokens
from megamod.parallel import dist_env_from, is_rank_zero


@dataclass(frozen=True)
class Prompt:
    """One question as the model reads it: the text (the task's suffix included) and its image."""

    text: str
    image: Path


@contextlib.contextmanager
def open_generator_on_every_rank(checkpoint_dir: str | Path) -> Iterator[Generator]:
    """`open_generator`'s model and tokenizer on every rank of the launcher's world (one
    process: a world of one). Each rank builds the whole model: the parallel layout is the
    checkpoint's one-process layout, so every other rank is data-parallel."""
    if dist_env_from(os.environ).world_size == 1:
        with open_generator(checkpoint_dir) as generator:
            yield generator
        return
    from megamod.data.tokenizer import load_tokenizer
    from megamod.models.build import build_model, one_process_config
    from megamod.parallel import destroy_distributed, init_distributed
    from megamod.training import checkpoint

    saved = checkpoint.saved_config(checkpoint_dir)
    tokenizer = load_tokenizer(checkpoint.tokenizer_of(checkpoint_dir, saved))
    config = one_process_config(saved, tokenizer.vocab_size)
    # A process group the caller made (one job evaluating several tasks) is kept: torch
    # cannot re-create one over the launcher's store, whose keys the first one left behind.
    own_group = not torch.distributed.is_initialized()
    init_distributed(config.parallel, config.train.seed)
    try:
        model = build_model(config, tokenizer)
        checkpoint.load_model_weights(checkpoint_dir, model)
        yield Generator(model, tokenizer, config)
    finally:
        if own_group:
            destroy_distributed()
        else:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()


def plan_batches(lengths: Sequence[int | None], batch_size: int) -> list[list[int]]:
    """Question indices in batches of prompts of one token length (None: skipped): a
    length's batch is closed when it holds `batch_size`, the partial ones at the end, in
    the order they were opened. No padding, which transformer-engine's attention could not
    mask."""
    batches: list[list[int]] = []
    open_by_length: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        if length is None:
            continue
        batch = open_by_length.setdefault(length, [])
        batch.append(index)
        if len(batch) == batch_size:
            batches.append(batch)
            open_by_length[length] = []
    batches.extend(batch for batch in open_by_length.values() if batch)
    return batches


def generate_batch(generator: Generator, encoded: Sequence[tuple[list[int], torch.Tensor]], number: int,
                   max_new_tokens: int, temperature: float = 0.0) -> list[str]:
    """The answers to one batch (`prompt_tokens`' ids and pixels per prompt), the batch
    numbered `number` in its run: megatron-core's RNG streams are seeded from it first."""
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(generator.config.train.seed + number)
    result = generator.generate([ids for ids, _ in encoded], torch.cat([pixels for _, pixels in encoded]),
                                max_new_tokens, temperature=temperature, seed=number)
    return [generator.tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in result.tokens]


def _all_gather(local: dict) -> dict:
    """Every rank's dict merged (the ranks' keys are disjoint)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return local
    parts: list[dict] = [{} for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


def answer(
    generator: Generator, prompts: Sequence[Prompt], max_new_tokens: int, batch_size: int
) -> tuple[dict[int, str], dict[int, str]]:
    """Greedy answers by prompt index, and why each prompt whose image did not read was
    skipped; the same dicts on every rank. Collective under a data-parallel world."""
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
        if torch.distributed.is_initialized() else (0, 1)

    # Prompt lengths, each rank a share (the image is read to check it; its pixels are
    # read again by the rank that answers it: an image costs milliseconds, a batch seconds).
    local_lengths: dict[int, int | str] = {}
    for index in range(rank, len(prompts), world):
        try:
            ids, _ = prompt_tokens(generator, prompts[index].text, [prompts[index].image])
            local_lengths[index] = len(ids)
        except DataError as e:
            local_lengths[index] = str(e)
    gathered = _all_gather(local_lengths)
    skipped = {i: v for i, v in gathered.items() if isinstance(v, str)}
    lengths = [None if i in skipped else gathered[i] for i in range(len(prompts))]

    batches = plan_batches(lengths, batch_size)
    texts: dict[int, str] = {}
    start = last_report = time.perf_counter()
    for number in range(rank, len(batches), world):
        batch = batches[number]
        encoded = [prompt_tokens(generator, prompts[i].text, [prompts[i].image]) for i in batch]
        for index, text in zip(batch, generate_batch(generator, encoded, number, max_new_tokens)):
            texts[index] = text
        if is_rank_zero() and time.perf_counter() - last_report > 30:
            last_report = time.perf_counter()
            print(f"[eval] rank 0: {number // world + 1}/{len(range(rank, len(batches), world))} "
                  f"batches ({last_report - start:.0f} s)", file=sys.stderr)
    return _all_gather(texts), skipped


def answer_question_set(generator: Generator, question_set: QuestionSet, max_new_tokens: int,
                        batch_size: int) -> tuple[dict[int, str], dict[int, str]]:
    """`answer` for a question set: its questions with the task's prompt suffix and their
    images; answers and skip reasons by index in `question_set.questions`. Collective under
    a data-parallel world."""
    prompts = [Prompt(question_set.task.prompt(q.text), question_set.images / q.image)
               for q in question_set.questions]
    return answer(generator, prompts, max_new_tokens, batch_size)
