"""A benchmark's question set, read and checked once for both its users: `megamod eval`
(its flags) and `eval.tasks` during training (an entry's config keys). The same reading
makes the same questions, ground truth and prompts, so training's scores are those
`megamod eval` gives the checkpoint; only the names in the error messages differ
(`InputNames`). Answering a set is `megamod.eval.answer.answer_question_set`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from megamod.data.formats import IMAGE_MARKER
from megamod.errors import DataError
from megamod.eval import mmbench
from megamod.eval.io import Question, read_annotations, read_questions
from megamod.eval.tasks import Task, vqav2_submission


@dataclass(frozen=True)
class InputNames:
    """What the user typed for a question set's inputs, for its error messages: `megamod
    eval`'s flags (`--questions q.jsonl`), or the keys of the `eval.tasks` entry `entry`
    (`eval.tasks[0].questions=q.jsonl`)."""

    entry: str | None = None  # "eval.tasks[i]"; None: megamod eval's flags

    def of(self, field: str, index: int | None = None) -> str:
        """An input's name: `--annotations`, `eval.tasks[0].annotations[1]` (`index`: which of a list)."""
        if self.entry is None:
            return "--" + field.replace("_", "-")
        return f"{self.entry}.{field}" + ("" if index is None else f"[{index}]")

    def given(self, field: str, value: Any, index: int | None = None) -> str:
        """An input as the user gave it: `--questions q.jsonl`, `eval.tasks[0].questions=q.jsonl`."""
        return f"{self.of(field, index)}{' ' if self.entry is None else '='}{value}"

    def context(self, task: Task) -> str:
        """What an error inside the files starts with: an `eval.tasks` entry and its task
        (the flags of one `megamod eval` need no introduction)."""
        return "" if self.entry is None else f"{self.entry} ({task.name}): "

    def file(self, field: str, path: Path, index: int | None = None) -> str:
        """A file in an error that `context` already introduces."""
        return self.given(field, path, index) if self.entry is None else str(path)


@dataclass(frozen=True)
class QuestionSet:
    """A question file read: the questions to ask (the first `limit` whose image is
    there), their ground truth, and what was left out."""

    task: Task
    source: Path  # the question file (MMBench: its TSV)
    questions: list[Question]  # those whose image is in `images`, in file order
    truth: list[dict] | None  # each question's ground truth; None: scored by the benchmark's server only
    images: Path  # the folder the questions' image paths are relative to
    image_source: str  # that folder as the user gave it, for messages
    every_question: list[Question]  # the image questions read (the first `limit`), missing images included
    text_only: int  # questions without an image in LLaVA's ScienceQA file, left out
    listed: list[Question] | None  # VQAv2's submission: every question of --submission-questions

    @property
    def missing_images(self) -> int:
        return len(self.every_question) - len(self.questions)

    def score(self, texts: dict[int, str]) -> dict:
        """The task's scores of the answers (text by index in `questions`) to the questions answered."""
        assert self.truth is not None, "a server-scored set has no local score"
        answered = sorted(texts)
        return self.task.score([texts[i] for i in answered], [self.truth[i] for i in answered],
                               [self.questions[i] for i in answered])


def load_question_set(task: Task, questions: Path, images: Path | None, annotations: Sequence[Path],
                      scratch_dir: Path, names: InputNames, *, submission_questions: Path | None = None,
                      limit: int | None = None, require_scores: bool = False) -> QuestionSet:
    """The question set of `task` in these files, checked before any model loads: a
    missing, malformed or mismatched file raises DataError naming the input as `names`
    has it. MMBench's images are decoded into `scratch_dir`, which must outlive the set.
    `require_scores`: refuse a set only the benchmark's server scores (VQAv2 without
    annotations, MMBench's test split)."""
    _check_inputs(task, questions, images, annotations, submission_questions, names)
    context = names.context(task)
    try:
        if task.mmbench_tsv:
            images = scratch_dir
            images.mkdir(parents=True, exist_ok=True)
            read, text_only = mmbench.read_questions(questions, images, names.file("questions", questions)), 0
            scored = mmbench.has_answers(read)
            if require_scores and not scored:
                raise DataError(f"{names.file('questions', questions)} has rows without an answer (a test "
                                f"split, scored by MMBench's server only): give the dev split")
        else:
            read, text_only = read_questions(questions, names.file("questions", questions))
            scored = not (task.submission and not annotations)
            if require_scores and not scored:
                raise DataError(f"{task.name} without annotations is scored by its evaluation server "
                                f"only: give {names.of('annotations')} (the val split's answers)")
        for q in read:
            if q.text.count(IMAGE_MARKER) > 1:
                raise DataError(f"{questions}:{q.line}: {IMAGE_MARKER} appears more than once, but "
                                f"a question has one image: keep one (or none)")
        listed = None
        if submission_questions is not None:
            named = names.file("submission_questions", submission_questions)
            listed = read_questions(submission_questions, named)[0]
        if task.mmbench_tsv:  # each row's answer is in its TSV
            truth = [q.fields for q in read] if scored else None
        elif scored:
            named_annotations = [names.file("annotations", a, i) for i, a in enumerate(annotations)]
            truth = task.ground_truth(read, read_annotations(annotations, named_annotations),
                                      " ".join(map(str, [questions, *annotations])), names.of("annotations"))
        else:
            vqav2_submission(read, {}, listed)  # the ids: a wrong one fails now, not after answering
            truth = None
    except DataError as e:
        raise DataError(f"{context}{e}") from None
    read = read[:limit]
    present = [i for i, q in enumerate(read) if (images / q.image).is_file()]
    image_source = f"the image column of {questions} (base64)" if task.mmbench_tsv \
        else names.given("images", images)
    if not present:
        raise DataError(f"{context}none of the images of {questions} is in {image_source}: give the "
                        f"folder its image paths are relative to, or MMBench's TSV unchanged")
    return QuestionSet(task, questions, [read[i] for i in present],
                       None if truth is None else [truth[i] for i in present], images, image_source,
                       read, text_only, listed)


def _check_inputs(task: Task, questions: Path, images: Path | None, annotations: Sequence[Path],
                  submission_questions: Path | None, names: InputNames) -> None:
    """The inputs' kinds (files, folders) and which go together, before any is read."""
    if task.mmbench_tsv:
        if images is not None or annotations:
            raise DataError(f"{names.given('task', task.name)}: MMBench's TSV holds the images and "
                            f"answers: leave out {names.of('images')} and {names.of('annotations')}")
    elif images is None or not images.is_dir():
        raise DataError(f"{names.given('images', images)} is not a folder: give the folder the "
                        f"questions' images are in")
    if submission_questions is not None and not (task.submission and not annotations):
        raise DataError(f"{names.of('submission_questions')} is for the server's submission (--task "
                        f"vqav2 without --annotations): leave it out")
    inputs = [("questions", questions, None), *[("annotations", a, i) for i, a in enumerate(annotations)]]
    if submission_questions is not None:
        inputs.append(("submission_questions", submission_questions, None))
    for field, path, index in inputs:
        release = field == "annotations" and task.name == "mme"
        if release and path.is_dir():
            continue  # MME's release folder (megamod.eval.io.mme_release_records)
        if not path.is_file():
            raise DataError(f"{names.given(field, path, index)} is not a file: give a file"
                            + (" or MME_Benchmark_release_version" if release else ""))
