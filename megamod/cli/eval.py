"""`megamod eval`: answer a benchmark's questions with a trained checkpoint and score them.

    [torchrun --nproc_per_node=N -m] megamod eval --checkpoint SAVE_DIR
        --task {pope,scienceqa_img,textvqa,vqav2,gqa,mme,mmbench,mmbench_cn}
        --questions FILE.jsonl|FILE.tsv [--images DIR] [--annotations FILE ...]
        [--output answers.jsonl] [--max-new-tokens N] [--batch-size B] [--json]

Greedy, batches of prompts of equal length, in one process or split over the
data-parallel ranks of a torchrun/srun job with the same answers (`megamod.eval.answer`);
formats, prompt suffixes and scorers are `megamod.eval`'s. Rank 0 writes the answers
(LLaVA's answer JSONL, question order), the scores beside them (`<output>.scores.json`)
and the server's submission file: VQAv2 without annotations (`<output>.submission.json`),
MMBench (`<output>.submission.xlsx`). Questions whose image is missing or unreadable are
skipped and counted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from megamod.data.formats import IMAGE_MARKER as IMAGE_TOKEN
from megamod.errors import DataError, MegamodError
from megamod.eval import mmbench
from megamod.eval.io import Question, answer_record, read_annotations, read_questions, write_json_atomically
from megamod.eval.tasks import TASKS, Task, vqav2_submission
from megamod.parallel import is_rank_zero
from megamod.training.logging import silence_upstream_warnings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megamod eval",
        description="Answer a benchmark's questions (LLaVA's question JSONL) with a trained "
        "checkpoint, greedily, and score them with the benchmark's official rules.",
    )
    p.add_argument("--checkpoint", required=True, help="a training run's checkpoint.save_dir")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--questions", required=True, type=Path,
                   help='JSONL: {"question_id", "image", "text", "category"?} a line; '
                   "mmbench: MMBench's TSV")
    p.add_argument("--images", type=Path,
                   help="the folder the questions' images are in (not for mmbench: its TSV holds them)")
    p.add_argument("--annotations", action="append", type=Path, default=[],
                   help="ground truth (repeat for several files; see the README's Evaluation section)")
    p.add_argument("--output", type=Path, default=Path("answers.jsonl"), help="the answer JSONL to write")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def _check_paths(args: argparse.Namespace, task: Task) -> None:
    if args.max_new_tokens < 1:
        raise MegamodError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if args.batch_size < 1:
        raise MegamodError(f"--batch-size={args.batch_size} must be >= 1")
    if task.mmbench_tsv:
        if args.images is not None or args.annotations:
            raise DataError(f"--task {task.name}: MMBench's TSV holds the images and answers: "
                            f"leave out --images and --annotations")
    elif args.images is None or not args.images.is_dir():
        raise DataError(f"--images {args.images} is not a folder: give the folder the "
                        f"questions' images are in")
    for flag, path in [("--questions", args.questions)] + [("--annotations", a) for a in args.annotations]:
        if not path.is_file():
            raise DataError(f"{flag} {path} does not exist: give a file")
        if path.resolve() == args.output.resolve():
            raise DataError(f"--output {args.output} is the input {flag}: write the answers elsewhere")


def _rows(value: Any, name: str = "") -> list[tuple[str, str]]:
    """Nested scores as (dotted name, value) rows."""
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in _rows(v, f"{name}.{k}" if name else str(k))]
    return [(name, f"{value:.4f}" if isinstance(value, float) else str(value))]


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    task = TASKS[args.task]
    _check_paths(args, task)
    with tempfile.TemporaryDirectory(prefix="megamod-eval-") as scratch:
        if task.mmbench_tsv:  # its images are decoded into the scratch folder
            images = Path(scratch)
            questions = mmbench.read_questions(args.questions, images)
        else:
            images = args.images
            questions = read_questions(args.questions)
        return _evaluate(args, task, questions, images)


def _evaluate(args: argparse.Namespace, task: Task, questions: list[Question], images: Path) -> int:
    for q in questions:
        if q.text.count(IMAGE_TOKEN) > 1:
            raise DataError(f"{args.questions}:{q.line}: {IMAGE_TOKEN} appears more than once, but "
                            f"a question has one image: keep one (or none)")
    annotations = read_annotations(args.annotations)
    if task.mmbench_tsv:
        submission_only, scored = False, mmbench.has_answers(questions)
    else:
        submission_only = task.submission and not args.annotations
        scored = not submission_only
    sources = " ".join(map(str, [args.questions, *args.annotations]))
    # Checked before the model loads: a missing label fails in a second, not after an hour.
    if submission_only:
        vqav2_submission(questions, {})  # the question ids
    if task.mmbench_tsv:  # each row's answer is in its TSV
        truth = [q.fields for q in questions]
    else:
        truth = task.ground_truth(questions, annotations, sources) if scored else None
    present = [q for q in questions if (images / q.image).is_file()]
    image_source = f"the image column of {args.questions} (base64)" if task.mmbench_tsv \
        else f"--images {images}"
    if not present:
        raise DataError(f"none of the images of {args.questions} is in {image_source}: "
                        f"give the folder its image paths are relative to, or MMBench's TSV unchanged")
    silence_upstream_warnings()  # before megatron-core is imported
    from megamod.eval.answer import Prompt, answer, open_generator_on_every_rank

    with open_generator_on_every_rank(args.checkpoint) as generator:
        prompts = [Prompt(task.prompt(q.text), images / q.image) for q in present]
        texts, unreadable = answer(generator, prompts, args.max_new_tokens, args.batch_size)
        writes = is_rank_zero()
    if not writes:
        return 0
    if len(present) < len(questions):
        print(f"[eval] skipped {len(questions) - len(present)} questions whose image is not in "
              f"{image_source}", file=sys.stderr)
    for i, reason in sorted(unreadable.items()):
        print(f"[eval] skipped question_id {present[i].question_id!r}: {reason}", file=sys.stderr)
    skipped = {"missing_image": len(questions) - len(present), "unreadable_image": len(unreadable)}
    if not texts:
        raise DataError(f"no image of {args.questions} in {image_source} reads: give JPEG or PNG files")
    model_id = Path(args.checkpoint).resolve().name
    by_line = {present[i].line: text for i, text in texts.items()}
    answered = [i for i, q in enumerate(questions) if q.line in by_line]
    records = [
        mmbench.answer_line(questions[i], by_line[questions[i].line], model_id) if task.mmbench_tsv
        else answer_record(questions[i], task.prompt(questions[i].text), by_line[questions[i].line], model_id)
        for i in answered
    ]
    write_json_atomically(args.output, records, jsonl=True)

    report: dict[str, Any] = {
        "task": task.name, "checkpoint": str(args.checkpoint), "answers": str(args.output),
        "questions": len(questions), "answered": len(answered), "skipped": skipped,
    }
    if submission_only:
        submission = args.output.with_suffix(".submission.json")
        write_json_atomically(submission, vqav2_submission(questions, by_line), jsonl=False)
        report["submission"] = str(submission)
    if task.mmbench_tsv:
        table = mmbench.submission_table(args.questions, questions, by_line)
        report["submission"] = str(mmbench.write_submission(args.output.with_suffix(".submission"), table))
    if scored:
        report["scores"] = task.score([by_line[questions[i].line] for i in answered],
                                      [truth[i] for i in answered], [questions[i] for i in answered])
    scores_file = args.output.with_suffix(".scores.json")
    write_json_atomically(scores_file, report, jsonl=False)
    if args.json:
        print(json.dumps(report))
    else:
        rows = _rows(report)
        width = max(len(name) for name, _ in rows)
        print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    return 0
