"""`megamod eval` end to end on a tiny checkpoint (one training step, so its answers are
nonsense): a POPE question file over three skimage pictures, a missing image and one
that is not a picture; the answer file's format and order, the skipped counts, the scores
equal to the scorer on the written answers; a malformed question line exits 2 naming it.
LLaVA's own files in, what the official tools read out: ScienceQA's `llava_test_CQM-A.json`
(its answers scored by llava-torch's `eval_science_qa.py`), `llava_mme.jsonl` with MME's
release folder, VQAv2's test-dev submission over the whole test2015 file and its val
annotations; an existing answer or scores file is kept unless --force.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megamod.eval import scorers
from megamod.eval.normalize import normalize_answer
from megamod.eval.tasks import OPTION_LETTER, SHORT_ANSWER
from tests.eval.test_scorers import LLAVA_MME, write_mme
from tests.launcher import check, free_port, run

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
def root(tmp_path_factory, tiny_checkpoint) -> Path:
    import numpy as np
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("eval")
    # tests/conftest.py's tiny run (its answers are nonsense, but any trained model does).
    shutil.copytree(tiny_checkpoint, root / "ckpt", ignore=shutil.ignore_patterns("megamod.lock"))
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


# `megamod.__main__.main` (what the console script runs) on each argument list of argv[1],
# in one process: one launch for several evaluations
EVALUATIONS = """
import json, sys
from megamod.__main__ import main
codes = [main(["eval", *args]) for args in json.loads(sys.argv[1])]
sys.exit(max(codes))
"""

SCIENCEQA = [  # llava_test_CQM-A.json's items (a JSON list): a text-only problem, two with an image
    {"id": "4", "conversations": [{"from": "human", "value": "Which figure of speech?\nA. chiasmus\nB. apostrophe"},
                                  {"from": "gpt", "value": "B"}]},
    {"id": "5", "image": "5/image.png",
     "conversations": [{"from": "human", "value": "<image>\nContext: a person.\nWhat is shown?\nA. a person\nB. a cat"},
                       {"from": "gpt", "value": "A"}]},
    {"id": "11", "image": "11/image.png",
     "conversations": [{"from": "human", "value": "<image>\nWhich animal?\nA. dog\nB. cat\nC. cow"},
                       {"from": "gpt", "value": "B"}]},
]
PROBLEMS = {"4": {"choices": ["chiasmus", "apostrophe"], "answer": 1},
            "5": {"choices": ["a person", "a cat"], "answer": 0},
            "11": {"choices": ["dog", "cat", "cow"], "answer": 1}}
VQA_HUMANS = {11: ["two"] * 3 + ["2"] * 7, 3: ["yes"] * 10, 8: ["red"] * 10}


def test_llavas_files_in_and_what_the_official_tools_read_out(root, official_llava):
    from PIL import Image

    files = root / "llava_files"
    pictures = root / "images"
    # ScienceQA as LLaVA's eval.zip lays it out: images/test/<id>/image.png
    for problem, picture in (("5", "astronaut"), ("11", "chelsea")):
        (files / "scienceqa" / "images" / problem).mkdir(parents=True)
        shutil.copy(pictures / f"{picture}.png", files / "scienceqa" / "images" / problem / "image.png")
    (files / "scienceqa" / "llava_test_CQM-A.json").write_text(json.dumps(SCIENCEQA, indent=2))
    (files / "scienceqa" / "problems.json").write_text(json.dumps(PROBLEMS))
    (files / "scienceqa" / "pid_splits.json").write_text(json.dumps({"test": list(PROBLEMS)}))
    # MME: the release folder is both the images and the ground truth
    release, mme_questions = write_mme(files)
    shutil.copy(pictures / "astronaut.png", release / "code_reasoning" / "0020.png")
    Image.open(pictures / "coffee.png").convert("RGB").save(release / "artwork" / "images" / "14777.jpg")
    # VQAv2: test-dev questions (one image missing) within the whole test2015 file; val annotations
    vqa = files / "vqav2"
    vqa.mkdir()
    dev = [(11, "coffee.png", "How many cups?"), (3, "chelsea.png", "Is it a cat?"), (8, "missing.jpg", "Color?")]
    (vqa / "dev.jsonl").write_text("".join(
        json.dumps({"question_id": i, "image": image, "text": text + SHORT_ANSWER}) + "\n" for i, image, text in dev))
    (vqa / "test2015.jsonl").write_text("".join(
        json.dumps({"question_id": i, "image": "x.jpg", "text": "?"}) + "\n" for i in (7, 11, 5, 3, 8)))
    (vqa / "val_annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": i, "image_id": 1, "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": n}
                                                      for n, a in enumerate(humans, 1)]}
        for i, humans in VQA_HUMANS.items()]}))

    common = ["--checkpoint", "ckpt", "--max-new-tokens", "4", "--batch-size", "2", "--json"]
    runs = [
        ["--task", "scienceqa_img", "--questions", files / "scienceqa" / "llava_test_CQM-A.json",
         "--images", files / "scienceqa" / "images", "--annotations", files / "scienceqa" / "problems.json",
         "--output", "llava/sqa.jsonl"],
        ["--task", "mme", "--questions", mme_questions, "--images", release, "--annotations", release,
         "--output", "llava/mme.jsonl"],
        ["--task", "vqav2", "--questions", vqa / "dev.jsonl", "--images", pictures,
         "--submission-questions", vqa / "test2015.jsonl", "--output", "llava/vqav2_dev.jsonl"],
        ["--task", "vqav2", "--questions", vqa / "dev.jsonl", "--images", pictures,
         "--annotations", vqa / "val_annotations.json", "--output", "llava/vqav2_val.jsonl"],
    ]
    check(run([sys.executable, "-c", EVALUATIONS, json.dumps([[*map(str, r), *common] for r in runs])],
              cwd=root, extra_env={"MASTER_PORT": str(free_port())}))

    def written(name: str) -> tuple[list[dict], dict]:
        answers = [json.loads(line) for line in (root / "llava" / f"{name}.jsonl").read_text().splitlines()]
        return answers, json.loads((root / "llava" / f"{name}.scores.json").read_text())

    # ScienceQA: the image problems answered, the text-only one counted; each prompt as
    # model_vqa_science.py writes it; the official script reads the answer file and agrees
    answers, report = written("sqa")
    assert [a["question_id"] for a in answers] == ["5", "11"]
    assert report["skipped"] == {"missing_image": 0, "unreadable_image": 0, "text_only": 1}
    for answer, item in zip(answers, SCIENCEQA[1:]):
        question = item["conversations"][0]["value"].replace("<image>", "").strip()
        assert answer["prompt"] == "<image>\n" + question + OPTION_LETTER
    official = subprocess.run(
        [sys.executable, str(official_llava / "llava" / "eval" / "eval_science_qa.py"),
         "--base-dir", str(files / "scienceqa"), "--result-file", str(root / "llava" / "sqa.jsonl"),
         "--output-file", str(root / "llava" / "sqa_output.json"),
         "--output-result", str(root / "llava" / "sqa_result.json")], capture_output=True, text=True)
    assert official.returncode == 0, official.stderr[-3000:]
    img_accuracy = re.search(r"IMG-Accuracy: ([0-9.]+)%", official.stdout).group(1)
    assert img_accuracy == f"{100 * report['scores']['accuracy']:.2f}"  # the image problems: ours
    result = json.loads((root / "llava" / "sqa_result.json").read_text())
    assert result["correct"] == report["scores"]["correct"]  # the text-only one: wrong there

    # MME: LLaVA's repeated ids matched to the release files' answers by question
    answers, report = written("mme")
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in LLAVA_MME]
    assert [a["prompt"] for a in answers] == [q["text"] for q in LLAVA_MME]
    assert report["scores"] == scorers.mme([a["text"] for a in answers], ["Yes", "No", "Yes", "No"],
                                           [q["category"] for q in LLAVA_MME], [q["image"] for q in LLAVA_MME])

    # VQAv2 test-dev: every test2015 question in its order, '' where not answered
    answers, report = written("vqav2_dev")
    text = {a["question_id"]: a["text"] for a in answers}
    assert sorted(text) == [3, 11] and report["skipped"]["missing_image"] == 1
    submission = json.loads((root / report["submission"]).read_text())
    assert submission == [{"question_id": i, "answer": normalize_answer(text[i]) if i in text else ""}
                          for i in (7, 11, 5, 3, 8)]

    # VQAv2 val: VQA's own annotation file scores the answers
    answers, report = written("vqav2_val")
    assert report["scores"] == scorers.vqa_accuracy([a["text"] for a in answers],
                                                    [VQA_HUMANS[a["question_id"]] for a in answers])


def test_existing_answers_are_kept_unless_force(tmp_path, capsys):
    """In-process, refused before any model loads: the answer file or the scores beside it."""
    from megamod.__main__ import main

    (tmp_path / "q.jsonl").write_text(json.dumps({**QUESTIONS[2], "label": "no"}) + "\n")  # its image is missing
    args = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--task", "pope", "--questions",
            str(tmp_path / "q.jsonl"), "--images", str(tmp_path), "--output", str(tmp_path / "a.jsonl")]
    for existing in ("a.jsonl", "a.scores.json"):
        (tmp_path / existing).write_text("mine\n")
        code = main(args)
        stderr = capsys.readouterr().err
        assert code == 2 and f"{tmp_path / existing} exists" in stderr and "--force" in stderr, stderr
        assert (tmp_path / existing).read_text() == "mine\n"
        (tmp_path / existing).unlink()
    (tmp_path / "a.scores.json").write_text("mine\n")
    # --force passes that check: the run goes on to the images (none here)
    code = main([*args, "--force"])
    stderr = capsys.readouterr().err
    assert code == 2 and "none of the images" in stderr, stderr
