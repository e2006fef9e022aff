"""Question, annotation and answer files in LLaVA's evaluation formats.

Questions (`llava/eval/model_vqa_loader.py:40-42,86`): JSONL, one object a line,
`{"question_id", "image", "text", "category"?}` (`image` relative to the image folder).
Answers (the same file, lines 118-124): JSONL in question order,
`{"question_id", "prompt", "text", "answer_id", "model_id", "metadata": {}}`.
Annotations (ground truth), any of: JSONL objects with a `question_id`; a JSON list of
them; TextVQA's `{"data": [...]}`; or a JSON object keyed by question id (GQA's
`*_questions.json`, ScienceQA's `problems.json`). Fields a question line carries besides
its own (POPE's `label`) count as ground truth too. `megamod.eval.tasks` matches questions
to records.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from megamod.errors import DataError


@dataclass(frozen=True)
class Question:
    question_id: str | int
    image: str
    text: str
    category: str | None
    line: int  # in the question file, from 1: a question's identity (ids repeat in LLaVA's TextVQA file)
    fields: dict[str, Any]  # the whole line (ground truth may ride along)

    @property
    def key(self) -> str:
        return str(self.question_id)


QUESTION_FORMAT = '{"question_id": ..., "image": "file.jpg", "text": "...", "category": "..."}'


def read_questions(path: Path) -> list[Question]:
    """Every question of a JSONL file; a malformed line raises DataError naming it."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--questions {path}: unreadable ({e}): give a JSONL question file") from None
    questions = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: not JSON ({e.msg}): each line is one object {QUESTION_FORMAT}"
            ) from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: not a JSON object: each line is one object {QUESTION_FORMAT}")
        for key, types, kind in (("question_id", (str, int), "string or integer"),
                                 ("image", str, "string"), ("text", str, "string")):
            if not isinstance(record.get(key), types) or isinstance(record.get(key), bool):
                raise DataError(f"{where}: '{key}' missing or not a {kind}: "
                                f"each line is one object {QUESTION_FORMAT}")
        category = record.get("category")
        if category is not None and not isinstance(category, str):
            raise DataError(f"{where}: 'category' is not a string: give a name or leave it out")
        questions.append(Question(record["question_id"], record["image"], record["text"], category,
                                  number, record))
    if not questions:
        raise DataError(f"--questions {path}: no questions: give a JSONL file, one object "
                        f"{QUESTION_FORMAT} a line")
    return questions


def _records(path: Path) -> list[dict]:
    """One annotation file's records in file order, each with its question_id."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--annotations {path}: unreadable ({e}): give a JSON or JSONL file") from None
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not JSON ({e.msg}): give a JSON file or "
                                    f"JSONL, one object with a question_id a line") from None
    if isinstance(whole, dict) and isinstance(whole.get("data"), list):
        whole = whole["data"]  # TextVQA
    elif isinstance(whole, dict) and "question_id" in whole:
        whole = [whole]  # JSONL of one line
    if isinstance(whole, dict):  # keyed by question id (GQA, ScienceQA)
        if not all(isinstance(v, dict) for v in whole.values()):
            raise DataError(f"--annotations {path}: a JSON object whose values are not all objects: "
                            f"give {{question_id: {{...}}}}, a list of objects with a question_id, or JSONL")
        return [{"question_id": k, **v} for k, v in whole.items()]
    if whole is not None:
        if not isinstance(whole, list):
            raise DataError(f"--annotations {path}: neither a list nor an object: give a list of "
                            f"objects with a question_id, {{question_id: {{...}}}}, or JSONL")
        records = [(f"{path} item {i}", r) for i, r in enumerate(whole)]
    for where, record in records:
        if not isinstance(record, dict) or not isinstance(record.get("question_id"), (str, int)):
            raise DataError(f"{where}: not an object with a question_id: every record names its question")
    return [record for _, record in records]


@dataclass(frozen=True)
class Annotations:
    """The annotation files' records, each file's in its order."""

    files: list[tuple[Path, list[dict]]]

    def by_id(self) -> dict[str, dict]:
        """Every record by question id as a string (a later file wins)."""
        return {str(r["question_id"]): r for _, records in self.files for r in records}


def read_annotations(paths: Sequence[Path]) -> Annotations:
    return Annotations([(path, _records(path)) for path in paths])


def answer_record(question: Question, prompt: str, text: str, model_id: str) -> dict:
    """One line of the answer file, as model_vqa_loader.py:118-124 writes it."""
    return {"question_id": question.question_id, "prompt": prompt, "text": text,
            "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}}


def write_json_atomically(path: Path, lines: Sequence[dict] | dict, jsonl: bool) -> None:
    """`lines` as JSONL (or one JSON document), written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    text = "".join(json.dumps(r) + "\n" for r in lines) if jsonl else json.dumps(lines, indent=2) + "\n"
    tmp.write_text(text)
    os.replace(tmp, path)
