"""`megamod eval`: answer a benchmark's questions with a trained checkpoint and score them.

    megamod eval --checkpoint SAVE_DIR --task {pope,scienceqa_img,textvqa,vqav2,gqa,mme}
        --questions FILE.jsonl --images DIR [--annotations FILE ...] [--output answers.jsonl]
        [--max-new-tokens N] [--batch-size B] [--json]

One process, greedy, batches of prompts of equal length (`megamod.inference`); formats,
prompt suffixes and scorers are `megamod.eval`'s. Writes the answers (LLaVA's answer
JSONL), the scores beside them (`<output>.scores.json`) and, for VQAv2 without
annotations, the server's result file (`<output>.submission.json`). Questions whose image
is missing or unreadable are skipped and counted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

from megamod.data.formats import IMAGE_MARKER as IMAGE_TOKEN
from megamod.errors import DataError, MegamodError
from megamod.eval.io import Question, answer_record, read_annotations, read_questions, write_json_atomically
from megamod.eval.tasks import TASKS, vqav2_submission
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
                   help='JSONL: {"question_id", "image", "text", "category"?} a line')
    p.add_argument("--images", required=True, type=Path, help="the folder the questions' images are in")
    p.add_argument("--annotations", action="append", type=Path, default=[],
                   help="ground truth (repeat for several files; see the README's Evaluation section)")
    p.add_argument("--output", type=Path, default=Path("answers.jsonl"), help="the answer JSONL to write")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def _check_paths(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise MegamodError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if args.batch_size < 1:
        raise MegamodError(f"--batch-size={args.batch_size} must be >= 1")
    if not args.images.is_dir():
        raise DataError(f"--images {args.images} is not a folder: give the folder the "
                        f"questions' images are in")
    for flag, path in [("--questions", args.questions)] + [("--annotations", a) for a in args.annotations]:
        if not path.is_file():
            raise DataError(f"{flag} {path} does not exist: give a file")
        if path.resolve() == args.output.resolve():
            raise DataError(f"--output {args.output} is the input {flag}: write the answers elsewhere")


def _answer(args: argparse.Namespace, questions: list[Question]) -> tuple[dict[int, dict], int]:
    """The answer records of the questions whose image reads, by question line, and how
    many images did not read. A batch holds prompts of one length: no padding, which
    transformer-engine's attention could not mask."""
    import torch

    from megamod.inference.generate import open_generator, prompt_tokens

    task = TASKS[args.task]
    records: dict[int, dict] = {}
    unreadable = 0
    start = last_report = time.perf_counter()
    with open_generator(args.checkpoint) as generator:
        model_id = Path(args.checkpoint).resolve().name
        buckets: dict[int, list[tuple[Question, str, list[int], torch.Tensor]]] = {}

        def run(batch: list[tuple[Question, str, list[int], torch.Tensor]]) -> None:
            nonlocal last_report
            result = generator.generate([b[2] for b in batch], torch.cat([b[3] for b in batch]),
                                        args.max_new_tokens, temperature=0.0)
            for (question, prompt, _, _), tokens in zip(batch, result.tokens):
                text = generator.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                records[question.line] = answer_record(question, prompt, text, model_id)
            if time.perf_counter() - last_report > 30:
                last_report = time.perf_counter()
                print(f"[eval] {len(records)}/{len(questions)} answered "
                      f"({last_report - start:.0f} s)", file=sys.stderr)

        for question in questions:
            prompt = task.prompt(question.text)
            try:
                ids, pixels = prompt_tokens(generator, prompt, [args.images / question.image])
            except DataError as e:
                print(f"[eval] skipped question_id {question.question_id!r}: {e}", file=sys.stderr)
                unreadable += 1
                continue
            bucket = buckets.setdefault(len(ids), [])
            bucket.append((question, prompt, ids, pixels))
            if len(bucket) == args.batch_size:
                run(bucket)
                bucket.clear()
        for bucket in buckets.values():
            if bucket:
                run(bucket)
    return records, unreadable


def _rows(value: Any, name: str = "") -> list[tuple[str, str]]:
    """Nested scores as (dotted name, value) rows."""
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in _rows(v, f"{name}.{k}" if name else str(k))]
    return [(name, f"{value:.4f}" if isinstance(value, float) else str(value))]


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    _check_paths(args)
    task = TASKS[args.task]
    questions = read_questions(args.questions)
    for q in questions:
        if q.text.count(IMAGE_TOKEN) > 1:
            raise DataError(f"{args.questions}:{q.line}: {IMAGE_TOKEN} appears more than once, but "
                            f"a question has one image: keep one (or none)")
    annotations = read_annotations(args.annotations)
    submission_only = task.submission and not args.annotations
    sources = " ".join(map(str, [args.questions, *args.annotations]))
    # Checked before the model loads: a missing label fails in a second, not after an hour.
    if submission_only:
        vqav2_submission(questions, {})  # the question ids
    truth = None if submission_only else task.ground_truth(questions, annotations, sources)
    present = [q for q in questions if (args.images / q.image).is_file()]
    if not present:
        raise DataError(f"none of the images of {args.questions} is under --images {args.images}: "
                        f"give the folder its image paths are relative to")
    if len(present) < len(questions):
        print(f"[eval] skipping {len(questions) - len(present)} questions whose image is not under "
              f"--images {args.images}", file=sys.stderr)
    silence_upstream_warnings()  # before megatron-core is imported
    records, unreadable = _answer(args, present)
    skipped = {"missing_image": len(questions) - len(present), "unreadable_image": unreadable}
    if not records:
        raise DataError(f"no image of {args.questions} under --images {args.images} reads: "
                        f"give JPEG or PNG files")
    answered = [i for i, q in enumerate(questions) if q.line in records]
    write_json_atomically(args.output, [records[questions[i].line] for i in answered], jsonl=True)

    report: dict[str, Any] = {
        "task": task.name, "checkpoint": str(args.checkpoint), "answers": str(args.output),
        "questions": len(questions), "answered": len(answered), "skipped": skipped,
    }
    if submission_only:
        texts = {k: r["text"] for k, r in records.items()}
        submission = args.output.with_suffix(".submission.json")
        write_json_atomically(submission, vqav2_submission(questions, texts), jsonl=False)
        report["submission"] = str(submission)
    else:
        report["scores"] = task.score([records[questions[i].line]["text"] for i in answered],
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
