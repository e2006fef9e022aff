"""`megamod eval`: answer a benchmark's questions with a trained checkpoint and score them.

    [torchrun --nproc_per_node=N -m] megamod eval --checkpoint SAVE_DIR
        --task {pope,scienceqa_img,textvqa,vqav2,gqa,mme,mmbench,mmbench_cn}
        --questions FILE.jsonl|FILE.json|FILE.tsv [--images DIR] [--annotations FILE|DIR ...]
        [--submission-questions FILE.jsonl] [--output answers.jsonl] [--force]
        [--max-new-tokens N] [--batch-size B] [--json]

Greedy, batches of prompts of equal length, in one process or split over the
data-parallel ranks of a torchrun/srun job with the same answers (`megamod.eval.answer`);
formats, prompt suffixes and scorers are `megamod.eval`'s. Rank 0 writes the answers
(LLaVA's answer JSONL, question order), the scores beside them (`<output>.scores.json`)
and the server's submission file: VQAv2 without annotations (`<output>.submission.json`),
MMBench (`<output>.submission.xlsx`); an existing one is replaced only with --force.
Questions whose image is missing or unreadable are skipped and counted, as are the
text-only ones of LLaVA's ScienceQA file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from megamod.cli.output import check_output
from megamod.errors import DataError, MegamodError
from megamod.eval import mmbench
from megamod.eval.io import answer_record, write_json_atomically
from megamod.eval.question_set import InputNames, QuestionSet, load_question_set
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
                   help='JSONL: {"question_id", "image", "text", "category"?} a line; scienceqa_img: '
                   "also LLaVA's llava_test_CQM-A.json; mmbench: MMBench's TSV")
    p.add_argument("--images", type=Path,
                   help="the folder the questions' images are in (not for mmbench: its TSV holds them)")
    p.add_argument("--annotations", action="append", type=Path, default=[],
                   help="ground truth (repeat for several files; mme: also MME_Benchmark_release_version; "
                   "see the README's Evaluate section)")
    p.add_argument("--submission-questions", type=Path,
                   help="vqav2 without --annotations: the whole test2015 question JSONL "
                   "(llava_vqav2_mscoco_test2015.jsonl); the submission lists each of its questions")
    p.add_argument("--output", type=Path, default=Path("answers.jsonl"), help="the answer JSONL to write")
    p.add_argument("--force", action="store_true",
                   help="replace an existing answer file and the scores and submission beside it")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def _check_args(args: argparse.Namespace, task: Task) -> None:
    """The numbers, and the files a run would write (before the inputs are read)."""
    if args.max_new_tokens < 1:
        raise MegamodError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if args.batch_size < 1:
        raise MegamodError(f"--batch-size={args.batch_size} must be >= 1")
    inputs = [p for p in (args.questions, *args.annotations, args.submission_questions) if p is not None]
    for written in _written(args, task):
        check_output(written, inputs, args.force)


def _written(args: argparse.Namespace, task: Task) -> list[Path]:
    """The files a run writes: the answers, the scores and the submission beside them."""
    files = [args.output, args.output.with_suffix(".scores.json")]
    if task.submission and not args.annotations:
        files.append(args.output.with_suffix(".submission.json"))
    if task.mmbench_tsv:  # .xlsx, or .tsv without openpyxl (mmbench.write_submission)
        files += [args.output.with_suffix(".submission.xlsx"), args.output.with_suffix(".submission.tsv")]
    return files


def _rows(value: Any, name: str = "") -> list[tuple[str, str]]:
    """Nested scores as (dotted name, value) rows."""
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in _rows(v, f"{name}.{k}" if name else str(k))]
    return [(name, f"{value:.4f}" if isinstance(value, float) else str(value))]


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    task = TASKS[args.task]
    _check_args(args, task)
    with tempfile.TemporaryDirectory(prefix="megamod-eval-") as scratch:  # MMBench's images
        # Checked before the model loads: a missing label fails in a second, not after an hour.
        question_set = load_question_set(task, args.questions, args.images, args.annotations, Path(scratch),
                                         InputNames(), submission_questions=args.submission_questions)
        return _evaluate(args, question_set)


def _evaluate(args: argparse.Namespace, qs: QuestionSet) -> int:
    task = qs.task
    silence_upstream_warnings()  # before megatron-core is imported
    from megamod.eval.answer import answer_question_set, open_generator_on_every_rank

    with open_generator_on_every_rank(args.checkpoint) as generator:
        texts, unreadable = answer_question_set(generator, qs, args.max_new_tokens, args.batch_size)
        writes = is_rank_zero()
    if not writes:
        return 0
    if qs.missing_images:
        print(f"[eval] skipped {qs.missing_images} questions whose image is not in {qs.image_source}",
              file=sys.stderr)
    for i, reason in sorted(unreadable.items()):
        print(f"[eval] skipped question_id {qs.questions[i].question_id!r}: {reason}", file=sys.stderr)
    skipped = {"missing_image": qs.missing_images, "unreadable_image": len(unreadable)}
    if qs.text_only:  # LLaVA's ScienceQA file: its problems without an image
        skipped["text_only"] = qs.text_only
    if not texts:
        raise DataError(f"no image of {qs.source} in {qs.image_source} reads: give JPEG or PNG files")
    model_id = Path(args.checkpoint).resolve().name
    answered = sorted(texts)  # in question order
    by_line = {qs.questions[i].line: texts[i] for i in answered}
    records = [
        mmbench.answer_line(qs.questions[i], texts[i], model_id) if task.mmbench_tsv
        else answer_record(qs.questions[i], task.recorded_prompt(qs.questions[i].text), texts[i], model_id)
        for i in answered
    ]
    write_json_atomically(args.output, records, jsonl=True)

    report: dict[str, Any] = {
        "task": task.name, "checkpoint": str(args.checkpoint), "answers": str(args.output),
        "questions": len(qs.every_question), "answered": len(answered), "skipped": skipped,
    }
    if task.submission and qs.truth is None:
        submission = args.output.with_suffix(".submission.json")
        lines = vqav2_submission(qs.every_question, by_line, qs.listed)
        write_json_atomically(submission, lines, jsonl=False)
        report["submission"] = str(submission)
    if task.mmbench_tsv:
        table = mmbench.submission_table(qs.source, qs.every_question, by_line)
        report["submission"] = str(mmbench.write_submission(args.output.with_suffix(".submission"), table))
    if qs.truth is not None:
        report["scores"] = qs.score(texts)
    scores_file = args.output.with_suffix(".scores.json")
    write_json_atomically(scores_file, report, jsonl=False)
    if args.json:
        print(json.dumps(report))
    else:
        rows = _rows(report)
        width = max(len(name) for name, _ in rows)
        print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    return 0
