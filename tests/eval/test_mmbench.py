"""MMBench (megamod/eval/mmbench.py) on worked examples: the TSV read as LLaVA reads it,
the prompts of every option rotation (model_vqa_mmbench.py --all-rounds), VLMEvalKit's
letter matching, the circular score, the submission table; and the batch plan
`megamod eval` shares between ranks."""

from __future__ import annotations

import base64
import csv

import pytest

from megamod.errors import DataError
from megamod.eval import mmbench
from megamod.eval.answer import plan_batches

HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
          "l2-category", "comment", "split"]
IMAGE = base64.b64encode(b"not decoded here").decode()


def write_tsv(path, rows, header=HEADER):
    with path.open("w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([header, *rows])
    return path


def row(index, question, hint, options, answer, category="cat1", l2="l2a"):
    options = (list(options) + ["nan"] * 4)[:4]
    return [index, question, hint, *options, answer, category, IMAGE, "src", l2, "nan", "dev"]


@pytest.fixture
def tsv(tmp_path):
    return write_tsv(tmp_path / "dev.tsv", [
        row(10, "What animal?", "nan", ["a dog", "a cat", "a bird", "a fish"], "B"),
        row(11, "A drink?", "On a table.", ["yes", "no"], "A", category="cat2", l2="l2b"),
        row(12, "Option None?", "", ["x", "y", "None", "z"], "A"),  # pandas reads "None" as missing
    ])


def test_rows_become_one_question_per_rotation(tsv, tmp_path):
    questions = mmbench.read_questions(tsv, tmp_path)
    assert [(q.question_id, q.fields["round_id"]) for q in questions] == \
        [(10, 0), (10, 1), (10, 2), (10, 3), (11, 0), (11, 1), (12, 0), (12, 1)]
    assert [q.line for q in questions] == list(range(1, 9))
    # the options' texts rotate under fixed letters; option_char says which original each is
    assert questions[0].text == "What animal?\nA. a dog\nB. a cat\nC. a bird\nD. a fish"
    assert questions[2].text == "What animal?\nA. a bird\nB. a fish\nC. a dog\nD. a cat"
    assert questions[2].fields["option_char"] == ["C", "D", "A", "B"]
    assert questions[5].text == "On a table.\nA drink?\nA. no\nB. yes"  # the hint first
    assert questions[7].text == "Option None?\nA. y\nB. x"  # the options end at "None"; no hint
    assert (tmp_path / questions[0].image).read_bytes() == b"not decoded here"
    assert mmbench.has_answers(questions)


def test_bad_rows_are_refused_naming_the_line(tmp_path):
    one_option = write_tsv(tmp_path / "a.tsv", [row(1, "q", "nan", ["x", "nan", "y"], "A")])
    with pytest.raises(DataError, match=r"a\.tsv:2: fewer than two options"):
        mmbench.read_questions(one_option, tmp_path)
    bad_answer = write_tsv(tmp_path / "b.tsv", [row(1, "q", "nan", ["x", "y"], "C")])
    with pytest.raises(DataError, match=r"b\.tsv:2: answer 'C' is not one of the options A, B"):
        mmbench.read_questions(bad_answer, tmp_path)
    no_image = write_tsv(tmp_path / "c.tsv", [["1", "q"]], header=["index", "question"])
    with pytest.raises(DataError, match="no column A, B, image"):
        mmbench.read_questions(no_image, tmp_path)


def test_letter_matching():
    abcd = ["A", "B", "C", "D"]
    assert mmbench.can_infer_option("B", abcd) == "B"
    assert mmbench.can_infer_option("The answer is (C).", abcd) == "C"
    assert mmbench.can_infer_option("B or C", abcd) is None  # two letters: unreadable
    assert mmbench.can_infer_option("A cat", abcd) == "A"  # the article counts, as upstream
    assert mmbench.can_infer_option("Cannot determine the answer", abcd) == "Z"
    assert mmbench.can_infer_option("Z", abcd) == "Z"
    assert mmbench.can_infer_option("E", abcd) is None
    choices = {"A": "a dog", "B": "a cat"}
    assert mmbench.infer_letter("it is a cat", choices) == "B"  # the option's text
    assert mmbench.infer_letter("cat", choices) is None
    assert mmbench.infer_letter("a dog or a cat", choices) is None
    assert choices == {"A": "a dog", "B": "a cat"}


def test_circular_score(tsv, tmp_path):
    questions = mmbench.read_questions(tsv, tmp_path)
    # row 10 (answer B, "a cat"): at rounds 0-3 "a cat" is shown as B, A, D, C
    texts = {1: "B", 2: "A", 3: "D", 4: "The answer is C."}
    texts |= {5: "A", 6: "A"}  # row 11 (answer A, "yes"): right, then wrong ("no" shown as A)
    texts |= {7: "A", 8: "B"}  # row 12: right
    scores = mmbench.score(texts, questions)
    assert scores["accuracy"] == pytest.approx(2 / 3) and scores["count"] == 3
    assert scores["vanilla_accuracy"] == 1.0
    assert scores["categories"] == {"cat1": {"accuracy": 1.0, "count": 2},
                                    "cat2": {"accuracy": 0.0, "count": 1}}
    assert scores["l2_categories"]["l2b"] == {"accuracy": 0.0, "count": 1}
    # a row not every round of which was answered is left out
    partial = {k: v for k, v in texts.items() if k != 4}
    assert mmbench.score(partial, questions)["count"] == 2


def test_submission_table(tsv, tmp_path):
    questions = mmbench.read_questions(tsv, tmp_path)
    table = mmbench.submission_table(tsv, questions, {1: "B", 2: "A", 5: "no idea"})
    assert table[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert table[1] == [10, "What animal?", "a dog", "a cat", "a bird", "a fish", "B", "B", "dev"]
    assert table[2] == [11, "A drink?", "yes", "no", None, None, "no idea", "A", "dev"]
    assert table[3][6] is None  # row 12 unanswered
    written = mmbench.write_submission(tmp_path / "answers.submission", table)
    assert written.name in ("answers.submission.xlsx", "answers.submission.tsv") and written.is_file()


def test_batch_plan():
    # equal lengths share a batch; a batch closes when full, the open ones follow in order
    assert plan_batches([5, 7, 5, None, 5, 7, 9], 2) == [[0, 2], [1, 5], [4], [6]]
    assert plan_batches([3, 3, 3], 1) == [[0], [1], [2]]
    assert plan_batches([None, None], 4) == []
