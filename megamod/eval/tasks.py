"""The benchmarks `megamod eval` runs: each one's prompt suffix, its ground truth and its
scorer.

Suffixes are LLaVA-1.5's. For ScienceQA, `model_vqa_science.py:62-64` appends it
(`--single-pred-prompt`); for the others LLaVA-1.5 ships question files whose text already
ends with it (`llava_vqav2_mscoco_test-dev2015.jsonl`, `llava_gqa_testdev_balanced.jsonl`,
`llava_textvqa_val_v051_ocr.jsonl`, `llava_pope_test.jsonl`, `llava_mme.jsonl`; its
`scripts/v1_5/eval/*.sh` add nothing), so a suffix is appended only where the text does
not already end with it: LLaVA's files and the benchmarks' raw questions get the same
prompt. (Written from LLaVA's repository as published; its scripts and question files
are not in the llava-torch package.)

MMBench (`mmbench`, `mmbench_cn`) reads its own TSV, with the images and answers in it:
`megamod.eval.mmbench`.

Ground truth is a field of the question's record: its line in the question file, updated
by its annotation record (`megamod.eval.io`), found by question_id, except where the
official code matches otherwise:
- TextVQA: first by (question_id, question) against the annotation's (image_id,
  question), as eval_textvqa.py:39-44 does (LLaVA's TextVQA question file uses image ids
  as question ids);
- POPE: each label file is `coco_pope_<category>.json`, its lines in order the labels of
  that category's questions in order, as eval_pope.py:74-80 + 6 pair them (POPE's label
  files number each category's questions from 1; LLaVA's question file renumbers them).
- MME: LLaVA's `llava_mme.jsonl` gives both questions of an image the image's path as
  question_id; a question is (subtask, image file, question text), as LLaVA's
  `convert_answer_to_mme.py` matches it against MME's release files
  (`megamod.eval.io.mme_release_records`). Records without a `question` (a JSONL of
  `{"question_id", "answer"}`) pair in order with the questions of their question_id.

The answer line's `prompt` is what LLaVA's answering script writes: the prompt, and for
ScienceQA "<image>\n" before it (`model_vqa_science.py:57`; `eval_science_qa.py` counts
a question as an image question by that marker).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from megamod.data.formats import IMAGE_MARKER
from megamod.errors import DataError
from megamod.eval import mmbench, scorers
from megamod.eval.io import Annotations, Question
from megamod.eval.normalize import normalize_answer

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
OPTION_LETTER = "\nAnswer with the option's letter from the given choices directly."
OPTION_LETTER_CN = "\n请直接回答选项字母。"  # model_vqa_mmbench.py:95-97 (--lang cn)


def _label(value: Any) -> bool:
    return value in ("yes", "no")


def _human_answers(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 10 and all(
        isinstance(a, str) or (isinstance(a, dict) and isinstance(a.get("answer"), str)) for a in value
    )


def _strings(value: Any) -> list[str]:
    """VQA's `[{"answer": ...}]` or TextVQA's `["..."]`, as strings."""
    return [a["answer"] if isinstance(a, dict) else a for a in value]


def _score_pope(texts: Sequence[str], truth: Sequence[dict], questions: Sequence[Question]) -> dict:
    return scorers.pope(texts, [t["label"] for t in truth], [q.category or "all" for q in questions])


def _score_scienceqa(texts: Sequence[str], truth: Sequence[dict], questions: Sequence[Question]) -> dict:
    return scorers.scienceqa(texts, [t["answer"] for t in truth], [len(t["choices"]) for t in truth])


def _score_vqa(texts: Sequence[str], truth: Sequence[dict], questions: Sequence[Question]) -> dict:
    return scorers.vqa_accuracy(texts, [_strings(t["answers"]) for t in truth])


def _score_gqa(texts: Sequence[str], truth: Sequence[dict], questions: Sequence[Question]) -> dict:
    return scorers.gqa(texts, [t["answer"] for t in truth])


def _score_mmbench(texts: Sequence[str], truth: Sequence[dict], questions: Sequence[Question]) -> dict:
    return mmbench.score({q.line: t for q, t in zip(questions, texts)}, questions)


def _score_mme(texts: Sequence[str], truth: Sequence[dict], questions: Sequence[Question]) -> dict:
    # the subtask: the question's category, or the release folder's (its record's)
    return scorers.mme(texts, [t["answer"] for t in truth],
                       [t.get("category") or "all" for t in truth], [q.image for q in questions])


@dataclass(frozen=True)
class Task:
    name: str
    suffix: str
    truth: dict[str, tuple[Callable[[Any], bool], str]]  # field -> (check, what it must be)
    score: Callable[[Sequence[str], Sequence[dict], Sequence[Question]], dict]
    submission: bool = False  # scored by a server when no annotations are given
    match: str = "question_id"  # or "textvqa", "pope", "mme": see the module's docstring
    mmbench_tsv: bool = False  # questions, images and answers in MMBench's TSV (megamod.eval.mmbench)
    marks_image: bool = False  # the answer line's prompt starts "<image>\n" (model_vqa_science.py)

    def prompt(self, text: str) -> str:
        return text if text.endswith(self.suffix) else text + self.suffix

    def recorded_prompt(self, text: str) -> str:
        """The answer line's `prompt`, as LLaVA's answering script for the task writes it."""
        prompt = self.prompt(text)
        return f"{IMAGE_MARKER}\n{prompt}" if self.marks_image and IMAGE_MARKER not in prompt else prompt

    def _key(self, q: Question) -> Any:
        """What identifies a question (the official matching)."""
        if self.match == "textvqa":
            return q.key, textvqa_question(self.prompt(q.text))
        if self.match == "mme":
            return mme_image(q.key), mme_question(q.text)
        return q.key

    def ground_truth(self, questions: Sequence[Question], annotations: Annotations, sources: str,
                     annotations_name: str = "annotations") -> list[dict]:
        """Each question's record (its line updated by its annotation); a repeated
        question, a missing or mistyped field raises DataError naming the question, the
        files it was looked for in (`sources`) and where to give it (`annotations_name`:
        what the user sets the annotation files with, e.g. "--annotations")."""
        by_id = annotations.by_id()
        by_text = {(str(r["image_id"]), r["question"].lower()): r for r in by_id.values()
                   if isinstance(r.get("question"), str) and "image_id" in r}
        matched_by_line = {"pope": _pope_by_line, "mme": _mme_by_line}.get(self.match)
        by_line = matched_by_line(questions, annotations) if matched_by_line else {}
        truth, seen = [], {}
        for q in questions:
            key = self._key(q)
            if key in seen:
                raise DataError(f"question line {q.line}: question_id {q.question_id!r} repeats line "
                                f"{seen[key]}: give every question its own id")
            seen[key] = q.line
            if matched_by_line:
                found = by_line.get(q.line, {})
            else:
                found = (by_text.get(key) if self.match == "textvqa" else None) or by_id.get(q.key, {})
            record = {**q.fields, **found}
            for field, (check, kind) in self.truth.items():
                if field not in record or not check(record[field]):
                    raise DataError(
                        f"question_id {q.question_id!r} (question line {q.line}): no '{field}' "
                        f"({kind}) in {sources}: give {annotations_name} with the {self.name} ground truth"
                    )
            truth.append(record)
        return truth


TASKS = {
    task.name: task for task in (
        Task("pope", SHORT_ANSWER, {"label": (_label, '"yes" or "no"')}, _score_pope, match="pope"),
        Task("scienceqa_img", OPTION_LETTER,
             {"answer": (lambda v: isinstance(v, int), "the right choice's index"),
              "choices": (lambda v: isinstance(v, list) and 0 < len(v) <= 5, "a list of up to 5 choices")},
             _score_scienceqa, marks_image=True),
        Task("textvqa", SHORT_ANSWER, {"answers": (_human_answers, "10 human answers")}, _score_vqa,
             match="textvqa"),
        Task("vqav2", SHORT_ANSWER, {"answers": (_human_answers, "10 human answers")}, _score_vqa,
             submission=True),
        Task("gqa", SHORT_ANSWER, {"answer": (lambda v: isinstance(v, str), "a string")}, _score_gqa),
        Task("mme", SHORT_ANSWER, {"answer": (lambda v: isinstance(v, str) and v.lower() in ("yes", "no"),
                                              '"Yes" or "No"')}, _score_mme, match="mme"),
        # ground truth and the submission: megamod.eval.mmbench
        Task("mmbench", OPTION_LETTER, {}, _score_mmbench, mmbench_tsv=True),
        Task("mmbench_cn", OPTION_LETTER_CN, {}, _score_mmbench, mmbench_tsv=True),
    )
}


def _pope_by_line(questions: Sequence[Question], annotations: Annotations) -> dict[int, dict]:
    """POPE's labels by question line: file `coco_pope_<category>.json` (eval_pope.py:75-77)
    in order against that category's questions in order (lines 6, 78-80)."""
    by_line = {}
    for path, records in annotations.files:
        if not (path.name.startswith("coco_pope_") and path.name.endswith(".json")):
            raise DataError(f"{path}: POPE's label files are named coco_pope_<category>.json "
                            f"(their lines are matched in order to that category's questions, as "
                            f"eval_pope.py does): give POPE's files, or a 'label' in each question line")
        category = path.name[len("coco_pope_"):-len(".json")]
        mine = [q for q in questions if q.category == category]
        if len(mine) != len(records):
            raise DataError(f"{path}: {len(records)} labels for the {len(mine)} questions "
                            f"of category '{category}' in the question file: give the question file "
                            f"and the label file of the same POPE split")
        by_line.update({q.line: r for q, r in zip(mine, records)})
    return by_line


def mme_image(question_id: str) -> str:
    """"<subtask>/<image file stem>" of an MME question id or release record, as
    convert_answer_to_mme.py:55-56 splits "artwork/images/10002.jpg" ("artwork", "10002.txt")."""
    parts = question_id.split("/")
    return f"{parts[0]}/{parts[-1].split('.')[0]}"


MME_YES_NO = "Please answer yes or no."


def mme_question(text: str) -> str:
    """An MME question without LLaVA's suffix or MME's "Please answer yes or no." (which
    convert_answer_to_mme.py:64-69 swaps in, with one space or two, to find it in MME's
    files)."""
    return text.replace(SHORT_ANSWER.strip(), "").replace(MME_YES_NO, "").strip()


def _mme_by_line(questions: Sequence[Question], annotations: Annotations) -> dict[int, dict]:
    """MME's ground truth by question line: a record with a `question` by (subtask, image,
    question); one without, the n-th of its question_id for the n-th question of that id."""
    by_question, in_order = {}, defaultdict(list)
    for _, records in annotations.files:
        for r in records:
            if isinstance(r.get("question"), str):
                by_question[mme_image(str(r["question_id"])), mme_question(r["question"])] = r
            else:
                in_order[str(r["question_id"])].append(r)
    by_line, seen = {}, defaultdict(int)  # seen: questions of each id so far
    for q in questions:
        found = by_question.get((mme_image(q.key), mme_question(q.text)))
        if found is None and seen[q.key] < len(in_order[q.key]):
            found = in_order[q.key][seen[q.key]]
        seen[q.key] += 1
        if found is not None:
            by_line[q.line] = found
    return by_line


def textvqa_question(prompt: str) -> str:
    """The question in a TextVQA prompt, lower-cased, as eval_textvqa.py:17-32
    (`prompt_processor`) finds it; "" where that function would fail its assert."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        question = match.group(1) if match else ""
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        question = ""
    return question.lower()


def vqav2_submission(questions: Sequence[Question], answers: dict[int, str],
                     listed: Sequence[Question] | None = None) -> list[dict]:
    """The VQAv2 server's result file, as LLaVA-1.5's `scripts/convert_vqav2_for_submission.py`
    writes it: `[{"question_id": int, "answer": EvalAI-normalised text}]` for every
    question of `listed` (the whole test2015 question file, which the converter lists;
    default `questions`), "" where there is no answer (`answers`: text by line in
    `questions`). A question of `questions` that `listed` lacks raises DataError."""
    for q in [*questions, *(listed or [])]:
        if not isinstance(q.question_id, int):
            raise DataError(f"question line {q.line}: VQAv2's question_id is an integer, not "
                            f"{q.question_id!r}: give the VQAv2 question ids")
    by_id = {q.question_id: normalize_answer(answers[q.line]) for q in questions if q.line in answers}
    if listed is not None:
        listed_ids = {q.question_id for q in listed}
        unlisted = [q for q in questions if q.question_id not in listed_ids]
        if unlisted:
            raise DataError(f"question line {unlisted[0].line}: question_id {unlisted[0].question_id} "
                            f"is not in --submission-questions: give the test2015 question file "
                            f"that holds --questions' split (llava_vqav2_mscoco_test2015.jsonl)")
    return [{"question_id": q.question_id, "answer": by_id.get(q.question_id, "")}
            for q in (questions if listed is None else listed)]
