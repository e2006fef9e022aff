"""MMBench: its question TSV, LLaVA-1.5's prompts over every rotation of the options, the
circular scoring of the dev split, and the submission table for the evaluation server.

Questions (`mmbench_dev_20230712.tsv`, `mmbench_dev_en_20231003.tsv`, the test files):
a TSV with a header, columns `index, question, hint, A, B, C, D, answer (dev), category,
l2-category, image (base64), ...`, read as LLaVA reads it (`pandas.read_table`, so a cell
pandas takes for a missing value is missing; `is_none`, model_vqa_mmbench.py:35-44).

Prompts, as haotian-liu/LLaVA `llava/eval/model_vqa_mmbench.py` (@064abb34) with
`--all-rounds --single-pred-prompt`: the options run up to the first missing one
(`get_options`, lines 46-53); per row one round per option (lines 78-81), each
`hint + "\\n"` (where there is one) + question + `"\\n" + letter + ". " + option` per
option (lines 84-90), the options' texts rotated by one after each round while the
letters stay A, B, ... (lines 144-146), `<image>\\n` first and the task's suffix last
(lines 91-100). Answer lines are that script's (lines 130-138): `question_id` is the
row's index, `round_id`, `prompt` the question without image and suffix, `options` and
`option_char` (the original letters in the order shown).

Scoring (dev, where every row has an `answer`): MMBench's circular evaluation: a row is
right only if every rotation's answer names the right option. The letter is read with
VLMEvalKit's exact matching (open-compass/VLMEvalKit `vlmeval/utils/matching_util.py`
@18fc37a5: `can_infer_option` lines 8-49, else `can_infer_text` lines 97-109, as
`can_infer` lines 112-115; the verbose quantifier check is off, as by default); the
server's ChatGPT fallback for answers it cannot read is not run: such an answer is wrong.

Submission (`<output>.submission.xlsx`, the test split's only score): LLaVA's
`scripts/convert_mmbench_for_submission.py` (@524a75b7, lines 18-26): the TSV's columns
less hint, category, source, image, comment and l2-category, `prediction` inserted as the
7th column. The prediction is the first round's answer (the options in their original
order): the official converter keeps whichever answer line comes last, which after
`--all-rounds` is a rotated round's letter; the server rotates the options itself. Written
with openpyxl, as the converter's `to_excel(engine='openpyxl')`; where openpyxl is not
installed, the same table as `<output>.submission.tsv` (the server wants the .xlsx: open
the TSV in a spreadsheet and save it as one).
"""

from __future__ import annotations

import base64
import binascii
import copy
import csv
import os
import sys
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from megamod.errors import DataError
from megamod.eval.io import Question

OPTION_LETTERS = ("A", "B", "C", "D")  # model_vqa_mmbench.py:22
# pandas.read_table's default missing-value strings (pandas' `io.parsers` STR_NA_VALUES):
# LLaVA reads the TSV with it, so an option "None" or "NA" ends the options there too.
PANDAS_NA = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})
SUBMISSION_DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")
REQUIRED_COLUMNS = ("index", "question", "A", "B", "image")


def _is_none(value: str) -> bool:
    """model_vqa_mmbench.py:35-44 on what pandas read: a missing cell, 'nan' or 'none'."""
    return value in PANDAS_NA or value.lower() in ("nan", "none")


def read_table(path: Path, named: str | None = None) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The TSV's header and its rows (line number, cells by column); errors name the file
    as `named` (what the user gave: `--questions PATH` by default)."""
    named = named or f"--questions {path}"
    csv.field_size_limit(sys.maxsize)  # a cell holds a whole base64 image
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter="\t")
            header = next(reader, [])
            rows = [(reader.line_num, cells) for cells in reader if cells]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{named}: not a readable TSV ({e}): "
                        f"give MMBench's question TSV") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{named}: no column {', '.join(missing)} in its header: give "
                        f"MMBench's question TSV (index, question, hint, A-D, answer, category, image)")
    table = []
    for line, cells in rows:
        if len(cells) != len(header):
            raise DataError(f"{path}:{line}: {len(cells)} cells for the header's {len(header)} columns: "
                            f"give MMBench's TSV unchanged")
        table.append((line, dict(zip(header, cells))))
    return header, table


def read_questions(path: Path, image_dir: Path, named: str | None = None) -> list[Question]:
    """Every round of every row as a question (in row order, rounds in order; `line`
    numbers them from 1), each row's image decoded into `image_dir`; errors name the file
    as `named` (default `--questions PATH`)."""
    named = named or f"--questions {path}"
    _, table = read_table(path, named)
    questions = []
    for line, row in table:
        where = f"{path}:{line}"
        try:
            index = int(row["index"])
        except ValueError:
            raise DataError(f"{where}: index {row['index']!r} is not an integer: "
                            f"give MMBench's TSV") from None
        options = []
        for letter in OPTION_LETTERS:
            if letter not in row or _is_none(row[letter]):
                break
            options.append(row[letter])
        if len(options) < 2:
            raise DataError(f"{where}: fewer than two options (A, B): give MMBench's TSV")
        answer = row.get("answer", "")
        if not _is_none(answer) and answer not in OPTION_LETTERS[: len(options)]:
            raise DataError(f"{where}: answer {answer!r} is not one of the options "
                            f"{', '.join(OPTION_LETTERS[: len(options)])}")
        image = f"{line}.img"
        try:
            (image_dir / image).write_bytes(base64.b64decode(row["image"], validate=True))
        except binascii.Error:
            pass  # no file: counted as a missing image
        question = row["question"]
        if not _is_none(row.get("hint", "")):
            question = row["hint"] + "\n" + question
        letters = list(OPTION_LETTERS[: len(options)])
        for round_id in range(len(options)):
            text = question + "".join(f"\n{c}. {o}" for c, o in zip(OPTION_LETTERS, options))
            fields = {"round_id": round_id, "options": options, "option_char": letters,
                      "answer": None if _is_none(answer) else answer, "tsv_line": line,
                      "category": row.get("category"), "l2-category": row.get("l2-category")}
            questions.append(Question(index, image, text, row.get("category"), len(questions) + 1, fields))
            options, letters = options[1:] + options[:1], letters[1:] + letters[:1]
    if not questions:
        raise DataError(f"{named}: no rows: give MMBench's question TSV")
    return questions


def answer_line(question: Question, text: str, model_id: str) -> dict:
    """A line of model_vqa_mmbench.py's answer file (lines 130-138)."""
    return {"question_id": question.question_id, "round_id": question.fields["round_id"],
            "prompt": question.text, "text": text, "options": question.fields["options"],
            "option_char": question.fields["option_char"], "answer_id": uuid.uuid4().hex,
            "model_id": model_id, "metadata": {}}


def has_answers(questions: Sequence[Question]) -> bool:
    """Every row carries its answer (the dev split)."""
    return all(q.fields["answer"] is not None for q in questions)


# ------------------------------------------------------------------------------ scoring


def can_infer_option(answer: str, choices: Sequence[str]) -> str | None:
    """matching_util.py:8-49: the one option letter standing alone among the answer's
    words (after `.()[],:;!*#{}` became spaces); "Z" for a refusal; else None."""
    if "Failed to obtain answer via API" in answer:
        return None
    refusals = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                "I'm sorry, but without the image provided", "Cannot determine the answer")
    if any(r in answer for r in refusals):
        return "Z"
    for c in ".()[],:;!*#{}":
        answer = answer.replace(c, " ")
    words = answer.split()
    found = [c for c in choices if c in words]
    if len(found) == 1:
        return found[0]
    if not found and "Z" in words:
        return "Z"
    return None


def can_infer_text(answer: str, choices: dict[str, str]) -> str | None:
    """matching_util.py:97-109: the one option whose text (lower-cased) is in the answer."""
    answer = answer.lower()
    found = [c for c, text in choices.items() if str(text).lower() in answer]
    return found[0] if len(found) == 1 else None


def infer_letter(answer: str, choices: dict[str, str]) -> str | None:
    """The letter an answer names (`can_infer`, matching_util.py:112-115); None: unreadable."""
    return can_infer_option(answer, list(choices)) or can_infer_text(answer, copy.copy(choices))


def round_correct(text: str, question: Question) -> bool:
    """Whether the answer to one rotation names the row's right option."""
    shown = question.fields["options"]
    letter = infer_letter(text, dict(zip(OPTION_LETTERS, shown)))
    if letter not in OPTION_LETTERS[: len(shown)]:
        return False
    return question.fields["option_char"][OPTION_LETTERS.index(letter)] == question.fields["answer"]


def score(texts: dict[int, str], questions: Sequence[Question]) -> dict:
    """Circular accuracy over the rows every round of which was answered (`texts` by
    question line), overall and per category and l2-category; `vanilla_accuracy`: the
    first round alone (the options in their original order)."""
    rounds: dict[int, list[Question]] = defaultdict(list)
    for q in questions:
        rounds[q.fields["tsv_line"]].append(q)
    answered = [r for r in rounds.values() if all(q.line in texts for q in r)]
    if not answered:
        return {"accuracy": 0.0, "vanilla_accuracy": 0.0, "count": 0}
    circular = [all(round_correct(texts[q.line], q) for q in r) for r in answered]
    vanilla = [round_correct(texts[r[0].line], r[0]) for r in answered]

    def by(field: str) -> dict[str, dict]:
        groups: dict[str, list[bool]] = defaultdict(list)
        for row, right in zip(answered, circular):
            if row[0].fields[field] is not None:
                groups[row[0].fields[field]].append(right)
        return {name: {"accuracy": sum(v) / len(v), "count": len(v)} for name, v in sorted(groups.items())}

    return {"accuracy": sum(circular) / len(circular), "vanilla_accuracy": sum(vanilla) / len(vanilla),
            "count": len(circular), "categories": by("category"), "l2_categories": by("l2-category")}


# ------------------------------------------------------------------------------ submission


def submission_table(path: Path, questions: Sequence[Question], texts: dict[int, str]) -> list[list]:
    """convert_mmbench_for_submission.py:18-26's table (header first) for the TSV at
    `path`: each row's first-round answer as its prediction, None where unanswered."""
    header, table = read_table(path)
    first_round = {q.fields["tsv_line"]: texts.get(q.line) for q in questions if q.fields["round_id"] == 0}
    kept = [c for c in header if c not in SUBMISSION_DROPPED]
    at = min(6, len(kept))
    rows = [kept[:at] + ["prediction"] + kept[at:]]
    for line, row in table:
        # as pandas reads and to_excel writes them: the index a number, missing cells empty
        cells: list = [int(row[c]) if c == "index" else None if row[c] in PANDAS_NA else row[c]
                       for c in kept]
        rows.append(cells[:at] + [first_round.get(line)] + cells[at:])
    return rows


def write_submission(stem: Path, rows: list[list]) -> Path:
    """The table as `<stem>.xlsx` (openpyxl), else `<stem>.tsv`; the file written."""
    try:
        from openpyxl import Workbook
    except ImportError:
        target = stem.with_name(stem.name + ".tsv")
        tmp = target.with_name(f".{target.name}.tmp")
        with tmp.open("w", newline="", encoding="utf-8") as f:
            csv.writer(f, delimiter="\t").writerows(["" if v is None else v for v in r] for r in rows)
        os.replace(tmp, target)
        print(f"[eval] openpyxl is not installed: wrote the submission as {target}; the MMBench "
              f"server takes .xlsx (pip install openpyxl, or save the TSV as .xlsx)", file=sys.stderr)
        return target
    target = stem.with_name(stem.name + ".xlsx")
    tmp = target.with_name(f".{target.name}.tmp")
    book = Workbook()
    for row in rows:
        book.active.append(row)
    book.save(tmp)
    os.replace(tmp, target)
    return target
