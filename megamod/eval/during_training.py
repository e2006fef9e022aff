"""Benchmarks during training (`eval.tasks`): the training model answers small question
sets at each evaluation, as `megamod eval` answers them on a checkpoint, and their scores
are logged as `eval/<task>/<metric>`. Built by `megamod train` (training, a layer below,
receives it as a callable: `megamod.training.validation.BenchmarkEvaluator`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from megamod.config import Config
from megamod.data.tokenizer import Tokenizer
from megamod.errors import ConfigError
from megamod.eval.answer import answer_question_set
from megamod.eval.question_set import InputNames, QuestionSet, load_question_set
from megamod.eval.tasks import TASKS
from megamod.inference.generate import Generator
from megamod.models.llava import LLaVA

logger = logging.getLogger("megamod")


class BenchmarkTasks:
    """`eval.tasks` answered by the training model at each evaluation, as `megamod eval`
    answers them on a checkpoint (the same `megamod.eval.question_set` and
    `answer_question_set`: the task's prompt suffix, batches of prompts of one length split
    over the data-parallel ranks, reseeded per batch, the official scorer), so a step's
    scores are those `megamod eval` gives its checkpoint. Built before training: a missing
    or malformed file raises a MegamodError naming its key. MMBench's images are decoded
    into `scratch`, which must outlive the run."""

    def __init__(self, config: Config, scratch: Path) -> None:
        self.entries = config.eval.tasks
        self.sets: list[QuestionSet] = []
        for i, entry in enumerate(self.entries):
            key = f"eval.tasks[{i}]"
            if entry.task not in TASKS:
                raise ConfigError(f"{key}.task={entry.task!r} is not one of {sorted(TASKS)}")
            self.sets.append(load_question_set(
                TASKS[entry.task], Path(entry.questions), None if entry.images is None else Path(entry.images),
                [Path(a) for a in entry.annotations], scratch / str(i), InputNames(key), limit=entry.limit,
                require_scores=True))
        self._reported = False

    def __call__(self, model: LLaVA, config: Config, tokenizer: Tokenizer) -> dict[str, float]:
        """`eval/<task>/<metric>` of `model` (whole on this rank; in eval mode, without
        gradients); the same on every rank. Collective over the world (= data parallel)."""
        generator = Generator(model, tokenizer, config)
        scalars: dict[str, float] = {}
        for i, (entry, qs) in enumerate(zip(self.entries, self.sets)):
            texts, unreadable = answer_question_set(generator, qs, entry.max_new_tokens, entry.batch_size)
            if not self._reported and (qs.missing_images or unreadable):  # said at the first evaluation
                logger.info(f"eval.tasks[{i}] ({qs.task.name}): scored without {qs.missing_images} questions "
                            f"whose image is missing and {len(unreadable)} whose image does not read")
            if texts:
                scalars.update(score_tags(qs.score(texts), f"eval/{qs.task.name}"))
        self._reported = True
        return scalars


def score_tags(scores: dict[str, Any], prefix: str) -> dict[str, float]:
    """A scorer's nested figures as `prefix/<name>[/<name>...]` scalars (counts too)."""
    tags = {}
    for name, value in scores.items():
        if isinstance(value, dict):
            tags.update(score_tags(value, f"{prefix}/{name}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            tags[f"{prefix}/{name}"] = float(value)
    return tags
