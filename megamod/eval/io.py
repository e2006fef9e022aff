"""Question, annotation and answer files in LLaVA's evaluation formats.

Questions (`llava/eval/model_vqa_loader.py:40-42,86`): JSONL, one object a line,
`{"question_id", "image", "text", "category"?}` (`image` relative to the image folder);
or the JSON list `model_vqa_science.py:36-45` reads (LLaVA's ScienceQA
`llava_test_CQM-A.json`): `{"id", "image"?, "conversations": [{"value": question}, ...]}`,
whose text-only items are counted and left out (megamod eval answers image questions).
Answers (model_vqa_loader.py:118-124): JSONL in question order,
`{"question_id", "prompt", "text", "answer_id", "model_id", "metadata": {}}`.
Annotations (ground truth), any of: JSONL objects with a `question_id`; a JSON list of
them; TextVQA's `{"data": [...]}`; VQA's `{"annotations": [...]}`
(`v2_mscoco_val2014_annotations.json`); a JSON object keyed by question id (GQA's
`*_questions.json`, ScienceQA's `problems.json`); or MME's release folder
(`MME_Benchmark_release_version`). Fields a question line carries besides its own (POPE's
`label`) count as ground truth too. `megamod.eval.tasks` matches questions to records.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from megamod.data.formats import IMAGE_MARKER
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


def read_questions(path: Path, named: str | None = None) -> tuple[list[Question], int]:
    """The image questions of a question file (JSONL, or model_vqa_science's JSON list) and
    the number of text-only ones left out; a malformed line or item raises DataError
    naming it, a file-wide problem names the file as `named` (what the user typed for it,
    e.g. "--questions q.jsonl"; default: its path)."""
    named = named or str(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{named}: unreadable ({e}): give a JSONL question file") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            items = None  # JSONL whose first line is not an object: refused below, naming it
        if isinstance(items, list):
            return _conversation_questions(path, named, items)
    questions = []
    lines = text.splitlines()
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
        raise DataError(f"{named}: no questions: give a JSONL file, one object "
                        f"{QUESTION_FORMAT} a line")
    return questions, 0


CONVERSATION_FORMAT = ('{"id": ..., "image": "file.png", '
                       '"conversations": [{"from": "human", "value": "..."}, ...]}')


def _conversation_questions(path: Path, named: str, items: list) -> tuple[list[Question], int]:
    """model_vqa_science.py's reading of its question file (lines 41-45): `id`, the first
    turn's text with `<image>` removed and stripped, `image` where there is one."""
    questions, text_only = [], 0
    for number, item in enumerate(items, 1):
        where = f"{path} item {number}"
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not (isinstance(turns, list) and turns and isinstance(turns[0], dict)
                and isinstance(turns[0].get("value"), str)):
            raise DataError(f"{where}: no 'conversations' whose first turn has a 'value' string: "
                            f"each item is {CONVERSATION_FORMAT}")
        if not isinstance(item.get("id"), (str, int)) or isinstance(item.get("id"), bool):
            raise DataError(f"{where}: 'id' missing or not a string or integer: each item is "
                            f"{CONVERSATION_FORMAT}")
        if "image" not in item:
            text_only += 1
            continue
        if not isinstance(item["image"], str):
            raise DataError(f"{where}: 'image' is not a string: give the image's path or leave it out")
        text = turns[0]["value"].replace(IMAGE_MARKER, "").strip()
        questions.append(Question(item["id"], item["image"], text, None, number, item))
    if not questions:
        raise DataError(f"{named}: no item has an image ({text_only} text-only): "
                        f"give the benchmark's image questions")
    return questions, text_only


def _records(path: Path, named: str) -> list[dict]:
    """One annotation file's records in file order, each with its question_id."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{named}: unreadable ({e}): give a JSON or JSONL file") from None
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
    elif isinstance(whole, dict) and isinstance(whole.get("annotations"), list):
        whole = whole["annotations"]  # VQA (v2_mscoco_val2014_annotations.json)
    elif isinstance(whole, dict) and "question_id" in whole:
        whole = [whole]  # JSONL of one line
    if isinstance(whole, dict):  # keyed by question id (GQA, ScienceQA)
        if not all(isinstance(v, dict) for v in whole.values()):
            raise DataError(f"{named}: a JSON object whose values are not all objects: "
                            f"give {{question_id: {{...}}}}, a list of objects with a question_id, or JSONL")
        return [{"question_id": k, **v} for k, v in whole.items()]
    if whole is not None:
        if not isinstance(whole, list):
            raise DataError(f"{named}: neither a list nor an object: give a list of "
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


def read_annotations(paths: Sequence[Path], named: Sequence[str] | None = None) -> Annotations:
    """Each file's records; a folder is MME's release (`mme_release_records`). A file-wide
    problem names the file as `named` has it (what the user typed; default: its path)."""
    names = named or [str(path) for path in paths]
    return Annotations([(path, mme_release_records(path, name) if path.is_dir() else _records(path, name))
                        for path, name in zip(paths, names)])


MME_RELEASE = "MME_Benchmark_release_version/<subtask>/[questions_answers_YN/]<image>.txt"


def mme_release_records(folder: Path, named: str | None = None) -> list[dict]:
    """MME's ground truth as its release folder holds it, read as LLaVA's
    `playground/data/eval/MME/convert_answer_to_mme.py` (`get_gt`) reads it: per subtask
    folder, `questions_answers_YN/` beside `images/` or the subtask folder itself; per
    image a `.txt` of "question<TAB>Yes|No" lines. Each record: `question_id`
    "<subtask>/<file>.txt", `category` the subtask, `question`, `answer`. `named`: the
    folder as the user gave it, for messages (default: its path)."""
    records = []
    for subtask in sorted(p for p in folder.iterdir() if p.is_dir()):
        answers = subtask / "questions_answers_YN" if (subtask / "images").exists() else subtask
        for file in sorted(answers.glob("*.txt")):
            try:
                lines = file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"{file}: unreadable ({e}): give MME's release files") from None
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                fields = line.strip().split("\t")
                if len(fields) != 2:
                    raise DataError(f"{file}:{number}: not 'question<TAB>answer': give MME's "
                                    f"release files unchanged")
                records.append({"question_id": f"{subtask.name}/{file.name}", "category": subtask.name,
                                "question": fields[0], "answer": fields[1]})
    if not records:
        raise DataError(f"{named or folder}: a folder is read as MME's release ({MME_RELEASE}), "
                        f"and it holds no such .txt file: give MME_Benchmark_release_version, or a file")
    return records


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
