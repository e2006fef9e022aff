"""`megamod eval` alone and under `torchrun --nproc_per_node=2`: the same answers, in
question order, on a POPE-format, a ScienceQA-format and an MMBench-format set (the
checkpoint and the sets: conftest.py). Two ranks run all three tasks in one launch
(`eval_tasks.py`).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from megamod.eval import mmbench
from tests.eval.conftest import WORKER
from tests.launcher import check, run, torchrun_command


def answers(out: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{task}.jsonl").read_text().splitlines()]


def test_torchrun_gives_the_answers_of_one_process(eval_root, single_run):
    root, one = eval_root, single_run
    two = check(run(torchrun_command(2, [str(WORKER), str(root), str(root / "two")]), cwd=root))
    reports = {name: [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
               for name, result in (("one", one), ("two", two))}
    assert len(reports["one"]) == len(reports["two"]) == 3  # rank 0 alone reports

    for task, expected_ids in (("pope", [1, 2, 3, 4, 6]), ("scienceqa_img", ["sqa1", "sqa2", "sqa3"]),
                               ("mmbench", [0] * 4 + [1] * 2 + [2] * 3)):
        alone, split = answers(root / "one", task), answers(root / "two", task)
        # in question order (rotations in order), the skipped questions left out
        assert [a["question_id"] for a in alone] == expected_ids
        assert [(a["question_id"], a["prompt"], a["text"]) for a in split] == \
            [(a["question_id"], a["prompt"], a["text"]) for a in alone], task
        # the comparison means something: the model's answers differ by question
        assert len({a["text"] for a in alone}) > 1, [a["text"] for a in alone]
        scores = {name: json.loads((root / name / f"{task}.scores.json").read_text())
                  for name in ("one", "two")}
        assert scores["one"]["scores"] == scores["two"]["scores"]

    # MMBench: one line per rotation, as model_vqa_mmbench.py writes them; the row whose
    # image does not decode counted as missing; the circular score is the scorer's on the
    # written answers; the submission table beside them
    lines = answers(root / "one", "mmbench")
    assert [a["round_id"] for a in lines] == [0, 1, 2, 3, 0, 1, 0, 1, 2]
    assert lines[1]["options"] == ["a cat", "a bird", "a fish", "a dog"]
    assert lines[1]["option_char"] == ["B", "C", "D", "A"]
    assert lines[1]["prompt"] == "What animal is this?\nA. a cat\nB. a bird\nC. a fish\nD. a dog"
    assert lines[4]["prompt"] == "Look at the table.\nIs this a drink?\nA. yes\nB. no"
    report = next(r for r in reports["one"] if r["task"] == "mmbench")
    assert report["skipped"] == {"missing_image": 2, "unreadable_image": 0}  # row 3: two rounds
    (root / "decoded").mkdir()
    questions = [q for q in mmbench.read_questions(root / "mmbench_dev.tsv", root / "decoded")
                 if q.fields["tsv_line"] != 5]
    assert report["scores"] == mmbench.score({q.line: a["text"] for q, a in zip(questions, lines)}, questions)
    table = read_submission(Path(report["submission"]))
    assert table[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert [row[6] for row in table[1:]] == [lines[0]["text"], lines[4]["text"], lines[6]["text"], None]


def read_submission(path: Path) -> list[list]:
    """The xlsx (or, without openpyxl, TSV) table, empty cells as None."""
    if path.suffix == ".xlsx":
        from openpyxl import load_workbook

        return [list(row) for row in load_workbook(path).active.iter_rows(values_only=True)]
    rows = list(csv.reader(io.StringIO(path.read_text()), delimiter="\t"))
    return [[int(c) if i == 0 and n else (c or None) for i, c in enumerate(row)]
            for n, row in enumerate(rows)]
