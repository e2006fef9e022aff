"""`megamod eval` end to end on a tiny checkpoint (one training step, so its answers are
nonsense): a POPE question file over three skimage pictures, a missing image and one
that is not a picture; the answer file's format and order, the skipped counts, the scores
equal to the scorer on the written answers; a malformed question line exits 2 naming it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from megamod.eval import scorers
from megamod.eval.tasks import SHORT_ANSWER
from tests.launcher import free_port, megamod_train, run

QUESTIONS = [
    {"question_id": 1, "image": "astronaut.png", "text": "Is there a person in the image?",
     "category": "adversarial"},
    {"question_id": 2, "image": "chelsea.png", "text": "Is there a cat in the image?", "category": "popular"},
    {"question_id": 3, "image": "missing.png", "text": "Is there a dog in the image?", "category": "random"},
    # q1's text: prompts of one length share a batch
    {"question_id": 4, "image": "coffee.png", "text": "Is there a person in the image?",
     "category": "random"},
    {"question_id": 5, "image": "broken.png", "text": "Is there a car in the image?", "category": "popular"},
]
LABELS = {1: "yes", 2: "yes", 3: "no", 4: "no", 5: "no"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    import numpy as np
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("eval")
    megamod_train(1, ["train.train_iters=1", "checkpoint.save_interval=null",
                      "logging.tensorboard_dir=null", f"checkpoint.save_dir={root}/ckpt"], cwd=root)
    (root / "images").mkdir()
    for name in ("astronaut", "chelsea", "coffee"):
        Image.fromarray(np.asarray(getattr(skimage.data, name)())).save(root / "images" / f"{name}.png")
    (root / "images" / "broken.png").write_text("not a picture")
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    # POPE's label files: JSONL, a category's labels in its questions' order
    for category in ("adversarial", "popular", "random"):
        (root / f"coco_pope_{category}.json").write_text("".join(
            json.dumps({"question_id": n, "label": LABELS[q["question_id"]]}) + "\n"
            for n, q in enumerate([q for q in QUESTIONS if q["category"] == category], 1)))
    return root


def megamod_eval(*args: object, cwd: Path):
    return run([sys.executable, "-m", "megamod", "eval", *map(str, args)], cwd=cwd,
               extra_env={"MASTER_PORT": str(free_port())})


def test_eval_command(root):
    result = megamod_eval("--checkpoint", "ckpt", "--task", "pope", "--questions", "questions.jsonl",
                          "--images", "images", "--annotations", "coco_pope_adversarial.json",
                          "--annotations", "coco_pope_popular.json", "--annotations", "coco_pope_random.json",
                          "--output", "out/answers.jsonl",
                          "--max-new-tokens", 4, "--batch-size", 2, "--json", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    answers = [json.loads(line) for line in (root / "out" / "answers.jsonl").read_text().splitlines()]

    # LLaVA's answer lines, in question order; the missing and the unreadable image's
    # questions skipped and counted
    assert [a["question_id"] for a in answers] == [1, 2, 4]
    for answer, question in zip(answers, [QUESTIONS[0], QUESTIONS[1], QUESTIONS[3]]):
        assert set(answer) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert answer["prompt"] == question["text"] + SHORT_ANSWER
        assert isinstance(answer["text"], str) and answer["model_id"] == "ckpt" and answer["metadata"] == {}
    assert len({a["answer_id"] for a in answers}) == 3
    assert (report["questions"], report["answered"]) == (5, 3)
    assert report["skipped"] == {"missing_image": 1, "unreadable_image": 1}

    # the scores are the scorer's on the written answers (JSON floats round-trip exactly)
    expected = scorers.pope([a["text"] for a in answers], [LABELS[a["question_id"]] for a in answers],
                            ["adversarial", "popular", "random"])
    assert report["scores"] == expected
    assert json.loads((root / "out" / "answers.scores.json").read_text()) == report


def test_a_malformed_question_line_exits_2_naming_it(tmp_path, capsys):
    """In-process (`megamod.__main__.main` is what the console script runs): the line is
    refused before any model loads."""
    from megamod.__main__ import main

    (tmp_path / "bad.jsonl").write_text(json.dumps(QUESTIONS[0]) + "\n" + '{"question_id": 9, "text": "x"}\n')
    code = main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--task", "pope", "--questions",
                 str(tmp_path / "bad.jsonl"), "--images", str(tmp_path),
                 "--output", str(tmp_path / "a.jsonl")])
    stderr = capsys.readouterr().err
    assert code == 2 and "bad.jsonl:2" in stderr and "'image'" in stderr, stderr
    assert not (tmp_path / "a.jsonl").exists()


def test_score_table_rows():
    from megamod.cli.eval import _rows

    assert _rows({"task": "pope", "scores": {"f1": 0.5, "categories": {"random": {"count": 2}}}}) == [
        ("task", "pope"), ("scores.f1", "0.5000"), ("scores.categories.random.count", "2")]
