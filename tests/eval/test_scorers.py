"""The scorers on worked examples computed by hand (the arithmetic is in the comments), and
against the official llava-torch 1.2.2.post1 code where it runs without torch: its
`m4c_evaluator.py` (EvalAI's answer processor, TextVQA's evaluator), `eval_pope.py`'s
`eval_pope` and the `eval_science_qa.py` script, from the side folder of the
`official_llava` fixture (tests/conftest.py; skipped only where it cannot be installed).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import random
import subprocess
import sys
from pathlib import Path

from dataclasses import replace

import pytest

from megamod.errors import DataError
from megamod.eval import scorers
from megamod.eval.io import Annotations, read_annotations, read_questions
from megamod.eval.normalize import normalize_answer
from megamod.eval.question_set import InputNames, load_question_set
from megamod.eval.tasks import OPTION_LETTER, SHORT_ANSWER, TASKS, textvqa_question, vqav2_submission

@pytest.fixture(scope="module")
def official_eval(official_llava) -> Path:
    return official_llava / "llava" / "eval"


def official(folder: Path, name: str):
    """An official module loaded from its file alone (`llava/__init__.py` imports torch)."""
    spec = importlib.util.spec_from_file_location(f"official_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ normalisation

NORMALISED = {
    "Two dogs.": "2 dogs",  # number word -> digit, final period gone
    "The cat's hat": "cat 's hat",  # article gone, "'s" split off (word_tokenize)
    "an apple": "apple",
    "isnt it?": "isn't it",  # contraction restored, "?" gone
    "dont know": "don't know",
    "3.5": "3.5",  # a period before a digit stays
    "1,000": "1000",
    "a-b": "b",  # "-" not beside a space -> a space; then "a" is an article
    "red - blue": "red blue",  # "-" beside a space -> removed
    "Yes, it is.": "yes it is",
    "none": "0",
    "  Ten\tcats\n": "10 cats",
}


def test_normalisation_worked_examples():
    for raw, expected in NORMALISED.items():
        assert normalize_answer(raw) == expected, raw


def test_normalisation_equals_the_official_processor(official_eval):
    processor = official(official_eval, "m4c_evaluator").EvalAIAnswerProcessor()
    rng = random.Random(0)
    alphabet = "ab. ,0123?!'s-/thenoiwdcl;()\n\t"
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))) for _ in range(3000)]
    for text in [*NORMALISED, *fuzz, "." * 40 + "x"]:  # 40 periods: the official count=32 quirk
        assert normalize_answer(text) == processor(text), repr(text)


# ------------------------------------------------------------------------------ VQA soft accuracy

# (prediction, 10 human answers, score by hand)
VQA_CASES = [
    # "2" said 3 times: leaving out one of those 3 leaves 2 -> 2/3, else 3 -> 1; (3*2/3 + 7)/10
    ("Two.", ["two", "two", "2"] + ["three"] * 7, 0.9),
    # "apple" once: left out -> 0, else 1/3; 9 * (1/3) / 10
    ("an apple", ["apple"] + ["pear"] * 9, 0.3),
    # "don't know" twice: (2 * 1/3 + 8 * 2/3) / 10
    ("dont know", ["don't know"] * 2 + ["unknown"] * 8, 0.6),
    # a sentence is not the short answer
    ("Yes, it is.", ["yes"] * 10, 0.0),
    ("1,000", ["1000"] * 10, 1.0),
]


def test_vqa_accuracy_worked_examples():
    for prediction, humans, expected in VQA_CASES:
        assert scorers.vqa_accuracy([prediction], [humans])["accuracy"] == pytest.approx(expected), prediction
    result = scorers.vqa_accuracy([c[0] for c in VQA_CASES], [c[1] for c in VQA_CASES])
    assert result == {"accuracy": pytest.approx(2.8 / 5), "count": 5}  # (0.9+0.3+0.6+0+1)/5


def test_vqa_accuracy_equals_textvqas_official_evaluator(official_eval):
    evaluator = official(official_eval, "m4c_evaluator").TextVQAAccuracyEvaluator()
    pred_list = [{"pred_answer": p, "gt_answers": h} for p, h, _ in VQA_CASES]
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
        expected = evaluator.eval_pred_list(pred_list)
    got = scorers.vqa_accuracy([c[0] for c in VQA_CASES], [c[1] for c in VQA_CASES])["accuracy"]
    assert got == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------------ POPE

POPE_YES_NO = {
    "Yes, there is a dog.": "yes",
    "No, there is not.": "no",
    "There is no cat in the image.": "no",
    "yes. But no.": "yes",  # only the first sentence counts
    "Not at all": "yes",  # "Not" (capital) is not among LLaVA's words
    "Nothing": "yes",
    "no": "no",
}

# adversarial: preds yes,no,no,yes vs labels yes,no,yes,no: TP=1 TN=1 FN=1 FP=1
#   -> acc 0.5, precision 1/2, recall 1/2, F1 0.5, yes-ratio 2/4
# popular: preds yes,yes("Not really"),no vs yes,yes,no: TP=2 TN=1 -> all 1, yes-ratio 2/3
# random: preds yes,no vs no,no: FP=1 TN=1 -> precision 0/1, recall 0/0 (official: a
#   ZeroDivisionError; here 0), F1 0, acc 0.5, yes-ratio 0.5
POPE_PREDICTIONS = ["Yes, there is a dog.", "No, there is not.", "There is no cat in the image.", "Yes",
                    "yes", "Not really", "no.",
                    "yes", "No"]
POPE_LABELS = ["yes", "no", "yes", "no", "yes", "yes", "no", "no", "no"]
POPE_CATEGORIES = ["adversarial"] * 4 + ["popular"] * 3 + ["random"] * 2


def test_pope_worked_example():
    for text, expected in POPE_YES_NO.items():
        assert scorers.pope_yes_no(text) == expected, text
    result = scorers.pope(POPE_PREDICTIONS, POPE_LABELS, POPE_CATEGORIES)
    per = result["categories"]
    assert per["adversarial"] == pytest.approx(
        {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5, "count": 4})
    assert per["popular"] == pytest.approx(
        {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 2 / 3, "count": 3})
    assert per["random"] == pytest.approx(
        {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.5, "count": 2})
    assert result["f1"] == pytest.approx(0.5)  # (0.5 + 1 + 0) / 3


def test_pope_equals_the_official_eval_pope(official_eval, tmp_path):
    eval_pope = official(official_eval, "eval_pope").eval_pope
    for category in ("adversarial", "popular"):  # random divides by zero in the official code
        idx = [i for i, c in enumerate(POPE_CATEGORIES) if c == category]
        labels = tmp_path / f"coco_pope_{category}.json"
        labels.write_text("".join(json.dumps({"label": POPE_LABELS[i]}) + "\n" for i in idx))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            eval_pope([{"text": POPE_PREDICTIONS[i]} for i in idx], str(labels))
        printed = dict(line.split(": ") for line in out.getvalue().splitlines() if ": " in line)
        ours = scorers.pope(POPE_PREDICTIONS, POPE_LABELS, POPE_CATEGORIES)["categories"][category]
        for name, key in [("Accuracy", "accuracy"), ("Precision", "precision"), ("Recall", "recall"),
                          ("F1 score", "f1"), ("Yes ratio", "yes_ratio")]:
            assert float(printed[name]) == pytest.approx(ours[key], abs=1e-12), (category, name)


# ------------------------------------------------------------------------------ ScienceQA

# (prediction, number of choices, right index, right by hand?)
SCIENCEQA_CASES = [
    ("A", 2, 0, True),
    ("B. The tree", 3, 1, True),  # "X. " prefix
    ("The answer is C.", 3, 2, True),
    ("C", 2, 0, False),  # a letter beyond the choices: index -1
    ("The answer is A. The answer is B.", 4, 0, False),  # two matches: FAILED
    ("a", 2, 0, False),  # lower case: FAILED
    ("B.", 2, 1, False),  # "B." is neither a letter nor "B. ...": FAILED
]


def test_scienceqa_worked_example():
    assert [scorers.scienceqa_letter(c[0]) for c in SCIENCEQA_CASES] == \
        ["A", "B", "C", "C", "FAILED", "FAILED", "FAILED"]
    result = scorers.scienceqa([c[0] for c in SCIENCEQA_CASES], [c[2] for c in SCIENCEQA_CASES],
                               [c[1] for c in SCIENCEQA_CASES])
    assert result == {"accuracy": pytest.approx(3 / 7), "correct": 3, "count": 7}


def test_scienceqa_equals_the_official_script(official_eval, tmp_path):
    script = official_eval / "eval_science_qa.py"
    ids = [str(i) for i in range(len(SCIENCEQA_CASES))]
    problems = {i: {"choices": ["x"] * c[1], "answer": c[2]} for i, c in zip(ids, SCIENCEQA_CASES)}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ids}))
    (tmp_path / "answers.jsonl").write_text("".join(
        json.dumps({"question_id": i, "prompt": "<image>\nq", "text": c[0]}) + "\n"
        for i, c in zip(ids, SCIENCEQA_CASES)))
    subprocess.run([sys.executable, str(script), "--base-dir", str(tmp_path), "--result-file",
                    str(tmp_path / "answers.jsonl"), "--output-file", str(tmp_path / "out.json"),
                    "--output-result", str(tmp_path / "result.json")], check=True, capture_output=True)
    result = json.loads((tmp_path / "result.json").read_text())
    ours = scorers.scienceqa([c[0] for c in SCIENCEQA_CASES], [c[2] for c in SCIENCEQA_CASES],
                             [c[1] for c in SCIENCEQA_CASES])
    assert result["correct"] == ours["correct"] and result["acc"] == pytest.approx(100 * ours["accuracy"])


# ------------------------------------------------------------------------------ GQA, MME


def test_gqa_worked_example():
    # "yes." -> "yes" right; "red" right; "the dog" != "dog"; "left" != "right": 2/4
    result = scorers.gqa(["Yes.", "red", "The dog", "left"], ["yes", "red", "dog", "right"])
    assert result == {"accuracy": 0.5, "correct": 2, "count": 4}


def test_mme_worked_example():
    texts = ["Yes", "No, there is not.", "The answer is yes", "not sure", "Nope"]
    assert [scorers.mme_yes_no(t) for t in texts] == ["yes", "no", "other", "no", "no"]
    predictions = ["Yes", "No, there is not.", "yes", "Yes", "The answer is yes", "not sure"]
    answers = ["Yes", "No", "Yes", "No", "Yes", "No"]
    subtasks = ["existence"] * 4 + ["code_reasoning"] * 2
    images = ["e/1.jpg", "e/1.jpg", "e/2.jpg", "e/2.jpg", "c/3.png", "c/3.png"]
    result = scorers.mme(predictions, answers, subtasks, images)
    # existence: 3 of 4 right (acc 75), image 1 both right, image 2 not (acc+ 50): 125
    assert result["subtasks"]["existence"] == pytest.approx(
        {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "count": 4})
    # code_reasoning: "other" wrong, "not sure" -> no right: acc 50, acc+ 0: 50
    assert result["subtasks"]["code_reasoning"] == pytest.approx(
        {"acc": 50.0, "acc_plus": 0.0, "score": 50.0, "count": 2})
    assert result["perception"] == pytest.approx(125.0) and result["cognition"] == pytest.approx(50.0)


# ------------------------------------------------------------------------------ files and tasks


def test_question_file_errors_name_the_line(tmp_path):
    path = tmp_path / "q.jsonl"
    good = json.dumps({"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "category": "random"})
    for bad, words in [("{not json", ["q.jsonl:2", "not JSON"]),
                       ('["a list"]', ["q.jsonl:2", "not a JSON object"]),
                       (json.dumps({"question_id": 2, "text": "x"}), ["q.jsonl:2", "'image'"]),
                       (json.dumps({"question_id": True, "image": "b.jpg", "text": "x"}),
                        ["q.jsonl:2", "'question_id'"])]:
        path.write_text(good + "\n" + bad + "\n")
        with pytest.raises(DataError) as error:
            read_questions(path)
        assert all(w in str(error.value) for w in words), str(error.value)
    path.write_text(good + "\n\n")
    (question,), text_only = read_questions(path)
    assert text_only == 0
    assert (question.question_id, question.image, question.category, question.line) == \
        (1, "a.jpg", "random", 1)


def test_annotation_formats(tmp_path):
    jsonl = tmp_path / "coco_pope_random.json"  # POPE's label files are JSONL
    jsonl.write_text('{"question_id": 1, "label": "yes"}\n{"question_id": 2, "label": "no"}\n')
    textvqa = tmp_path / "textvqa.json"
    textvqa.write_text(json.dumps({"data": [{"question_id": 3, "answers": ["a"] * 10}]}))
    keyed = tmp_path / "gqa.json"
    keyed.write_text(json.dumps({"4": {"answer": "red"}}))
    read = read_annotations([jsonl, textvqa, keyed])
    assert [len(records) for _, records in read.files] == [2, 1, 1]
    assert read.by_id() == {"1": {"question_id": 1, "label": "yes"}, "2": {"question_id": 2, "label": "no"},
                            "3": {"question_id": 3, "answers": ["a"] * 10},
                            "4": {"question_id": "4", "answer": "red"}}
    one = tmp_path / "one.jsonl"
    one.write_text('{"question_id": 7, "answer": "no"}\n')
    assert read_annotations([one]).by_id() == {"7": {"question_id": 7, "answer": "no"}}
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question_id": 1}\n{oops\n')
    with pytest.raises(DataError, match="broken.jsonl:2"):
        read_annotations([broken])


def test_tasks_prompts_ground_truth_and_submission(tmp_path):
    assert TASKS["pope"].prompt("Is there a dog?") == "Is there a dog?" + SHORT_ANSWER
    assert TASKS["pope"].prompt("Is there a dog?" + SHORT_ANSWER) == "Is there a dog?" + SHORT_ANSWER
    assert TASKS["scienceqa_img"].prompt("Q\nA. x\nB. y") == "Q\nA. x\nB. y" + OPTION_LETTER
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question_id": 5, "image": "a.jpg", "text": "?", "label": "yes"}) + "\n"
                    + json.dumps({"question_id": 6, "image": "b.jpg", "text": "?"}) + "\n")
    questions, _ = read_questions(path)
    none = Annotations([])
    assert TASKS["pope"].ground_truth(questions[:1], none, "q.jsonl")[0]["label"] == "yes"  # in the line
    with pytest.raises(DataError, match=r"question_id 6 \(question line 2\): no 'label'"):
        TASKS["pope"].ground_truth(questions, none, "q.jsonl")
    with pytest.raises(DataError, match="10 human answers"):
        nine = Annotations([(path, [{"question_id": 5, "answers": ["x"] * 9}])])
        TASKS["vqav2"].ground_truth(questions[:1], nine, "a.json")
    red = Annotations([(path, [{"question_id": "6", "answer": "red"}])])  # "6" matches 6
    assert TASKS["gqa"].ground_truth(questions[1:], red, "a.json")[0]["answer"] == "red"
    with pytest.raises(DataError, match="question line 2: question_id 5 repeats line 1"):
        TASKS["pope"].ground_truth([questions[0], replace(questions[0], line=2)], none, "q.jsonl")
    assert vqav2_submission(questions, {1: "Two dogs."}) == [
        {"question_id": 5, "answer": "2 dogs"}, {"question_id": 6, "answer": ""}]


def test_textvqa_matches_llavas_question_file_as_eval_textvqa_does(tmp_path):
    """LLaVA's TextVQA question file uses the image id as question_id (eval_textvqa.py:39-44
    matches (image_id, question)); TextVQA's own ids match directly."""
    ocr = "\nReference OCR token: Nikon, D90"
    assert textvqa_question("What brand?" + ocr + SHORT_ANSWER) == "what brand?"
    assert textvqa_question("Reference OCR token: x\nWhat brand?\nAnswer.") == "what brand?"
    assert textvqa_question("OCR tokens: a b Question: Why? Short answer:") == "why?"
    assert textvqa_question("What brand?") == ""  # one line: the official assert fails
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in [
        {"question_id": "003a", "image": "003a.jpg", "text": "What brand?" + ocr + SHORT_ANSWER},
        {"question_id": "003a", "image": "003a.jpg", "text": "What colour?" + SHORT_ANSWER},
        {"question_id": 7, "image": "b.jpg", "text": "How many?"},
    ]))
    records = [{"question_id": i, "image_id": "003a" if i < 7 else "b", "question": q, "answers": [a] * 10}
               for i, q, a in [(1, "what brand?", "nikon"), (2, "What colour?", "black"), (7, "x", "2")]]
    truth = TASKS["textvqa"].ground_truth(read_questions(path)[0], Annotations([(path, records)]), "a.json")
    assert [t["answers"][0] for t in truth] == ["nikon", "black", "2"]


def test_pope_labels_pair_in_order_within_a_category(tmp_path):
    """eval_pope.py pairs coco_pope_<category>.json's lines with that category's answers in
    order (its ids number each category from 1, LLaVA's question file renumbers them)."""
    path = tmp_path / "q.jsonl"
    path.write_text("".join(
        json.dumps({"question_id": i, "image": "a.jpg", "text": "?", "category": c}) + "\n"
        for i, c in [(101, "random"), (102, "popular"), (103, "random")]))
    questions, _ = read_questions(path)
    labels = Annotations([
        (tmp_path / "coco_pope_random.json",
         [{"question_id": 1, "label": "no"}, {"question_id": 2, "label": "yes"}]),
        (tmp_path / "coco_pope_popular.json", [{"question_id": 1, "label": "yes"}]),
    ])
    assert [t["label"] for t in TASKS["pope"].ground_truth(questions, labels, "x")] == ["no", "yes", "yes"]
    short = Annotations([(tmp_path / "coco_pope_random.json", [{"question_id": 1, "label": "no"}])])
    with pytest.raises(DataError, match="1 labels for the 2 questions of category 'random'"):
        TASKS["pope"].ground_truth(questions, short, "x")
    with pytest.raises(DataError, match="coco_pope_<category>.json"):
        TASKS["pope"].ground_truth(questions, Annotations([(tmp_path / "labels.json", [])]), "x")


def test_scienceqa_reads_llavas_question_file(tmp_path):
    """LLaVA's `llava_test_CQM-A.json` as model_vqa_science.py reads it: `id`, the first
    turn with `<image>` removed and stripped; text-only problems left out and counted; the
    answer line's prompt as that script writes it (lines 46-64: "<image>\\n" first)."""
    path = tmp_path / "llava_test_CQM-A.json"
    path.write_text(json.dumps([
        {"id": "4", "conversations": [{"from": "human", "value": "Which figure?\nA. x\nB. y"},
                                      {"from": "gpt", "value": "B"}]},
        {"id": "5", "image": "5/image.png",
         "conversations": [{"from": "human", "value": "<image>\nContext: a test.\nWhich?\nA. x\nB. y"},
                           {"from": "gpt", "value": "B"}]},
        {"id": "11", "image": "11/image.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat colony?\nA. Maryland\nB. Vermont\n"}]},
    ], indent=2))
    questions, text_only = read_questions(path)
    assert text_only == 1
    assert [(q.question_id, q.image, q.text, q.line) for q in questions] == [
        ("5", "5/image.png", "Context: a test.\nWhich?\nA. x\nB. y", 2),
        ("11", "11/image.png", "What colony?\nA. Maryland\nB. Vermont", 3)]
    assert TASKS["scienceqa_img"].recorded_prompt(questions[0].text) == \
        "<image>\nContext: a test.\nWhich?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly."
    assert TASKS["pope"].recorded_prompt("Is there a dog?") == "Is there a dog?" + SHORT_ANSWER  # loader's prompt
    path.write_text(json.dumps([{"id": "5", "image": "5/image.png", "conversations": []}]))
    with pytest.raises(DataError, match="item 1: no 'conversations'"):
        read_questions(path)
    path.write_text(json.dumps([{"id": "4", "conversations": [{"value": "Which?"}]}]))
    with pytest.raises(DataError, match=r"no item has an image \(1 text-only\)"):
        read_questions(path)


MME_RELEASE_FILES = {
    # a subtask with its images and answers side by side
    "code_reasoning/0020.txt": "Is a python code shown in the picture? Please answer yes or no.\tYes\n"
                               "Is a c++ code shown in the picture? Please answer yes or no.\tNo\n",
    # one with images/ and questions_answers_YN/; MME's two-space question, found by the
    # converter's second try
    "artwork/questions_answers_YN/14777.txt": "Does this artwork belong to the type of religious?  "
                                               "Please answer yes or no.\tNo\n"
                                               "Does this artwork belong to the type of historical? "
                                               "Please answer yes or no.\tYes\n",
    "artwork/images/14777.jpg": "",
    "artwork/questions_answers_YN/readme.md": "not a .txt: ignored",
}
LLAVA_MME = [  # llava_mme.jsonl's lines: an image's two questions share its path as question_id
    {"question_id": "code_reasoning/0020.png", "image": "code_reasoning/0020.png",
     "text": "Is a python code shown in the picture?" + SHORT_ANSWER, "category": "code_reasoning"},
    {"question_id": "code_reasoning/0020.png", "image": "code_reasoning/0020.png",
     "text": "Is a c++ code shown in the picture?" + SHORT_ANSWER, "category": "code_reasoning"},
    {"question_id": "artwork/images/14777.jpg", "image": "artwork/images/14777.jpg",
     "text": "Does this artwork belong to the type of historical?" + SHORT_ANSWER, "category": "artwork"},
    {"question_id": "artwork/images/14777.jpg", "image": "artwork/images/14777.jpg",
     "text": "Does this artwork belong to the type of religious?" + SHORT_ANSWER, "category": "artwork"},
]


def write_mme(root: Path) -> tuple[Path, Path]:
    """MME's release folder and LLaVA's question file (above) under root."""
    release = root / "MME_Benchmark_release_version"
    for name, text in MME_RELEASE_FILES.items():
        (release / name).parent.mkdir(parents=True, exist_ok=True)
        (release / name).write_text(text)
    questions = root / "llava_mme.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in LLAVA_MME))
    return release, questions


def test_mme_matches_llavas_question_file_as_convert_answer_to_mme_does(tmp_path):
    """convert_answer_to_mme.py finds each answer's ground truth by (subtask, image file,
    question) in MME's release files; LLaVA's question ids repeat per image."""
    release, path = write_mme(tmp_path)
    questions, _ = read_questions(path)
    truth = TASKS["mme"].ground_truth(questions, read_annotations([release]), str(release))
    assert [t["answer"] for t in truth] == ["Yes", "No", "Yes", "No"]
    assert [t["category"] for t in truth] == ["code_reasoning", "code_reasoning", "artwork", "artwork"]
    # code_reasoning: both right (acc 100, acc+ 100: 200); artwork: one of two (50, 0: 50)
    scores = TASKS["mme"].score(["Yes", "No", "No", "No"], truth, questions)
    assert scores == {"perception": 50.0, "cognition": 200.0, "subtasks": {
        "artwork": {"acc": 50.0, "acc_plus": 0.0, "score": 50.0, "count": 2},
        "code_reasoning": {"acc": 100.0, "acc_plus": 100.0, "score": 200.0, "count": 2}}}

    # {"question_id", "answer"} lines without the question: the n-th of an id for its n-th question
    by_order = tmp_path / "mme_answers.jsonl"
    by_order.write_text("".join(json.dumps({"question_id": q["question_id"], "answer": a}) + "\n"
                                for q, a in zip(LLAVA_MME, ["No", "Yes", "No", "No"])))
    truth = TASKS["mme"].ground_truth(questions, read_annotations([by_order]), "x")
    assert [t["answer"] for t in truth] == ["No", "Yes", "No", "No"]
    three = Annotations([(by_order, read_annotations([by_order]).files[0][1][:3])])
    with pytest.raises(DataError, match=r"question line 4\): no 'answer'"):
        TASKS["mme"].ground_truth(questions, three, "x")
    (release / "code_reasoning" / "0021.txt").write_text("Is it? Please answer yes or no.\n")
    with pytest.raises(DataError, match="0021.txt:1: not 'question<TAB>answer'"):
        read_annotations([release])
    (tmp_path / "empty" / "existence").mkdir(parents=True)
    with pytest.raises(DataError, match="no such .txt file"):
        read_annotations([tmp_path / "empty"])


def test_vqav2_official_annotations_and_the_whole_submission(tmp_path):
    """VQA's `v2_mscoco_val2014_annotations.json` (`{"annotations": [...]}`, 10 answer
    objects each) is VQAv2's val ground truth; the test-dev submission lists every question
    of the test2015 file, '' for those not answered (convert_vqav2_for_submission.py)."""
    annotations = tmp_path / "v2_mscoco_val2014_annotations.json"
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
               for i, a in enumerate(["two"] * 3 + ["2"] * 7)]
    annotations.write_text(json.dumps({"info": {}, "license": {}, "data_subtype": "val2014", "annotations": [
        {"question_id": 11, "image_id": 9, "answer_type": "number", "multiple_choice_answer": "2",
         "answers": answers}]}))
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question_id": 11, "image": "COCO_val2014_000000000009.jpg",
                                "text": "How many?"}) + "\n")
    questions, _ = read_questions(path)
    truth = TASKS["vqav2"].ground_truth(questions, read_annotations([annotations]), str(annotations))
    assert TASKS["vqav2"].score(["Two"], truth, questions) == {"accuracy": 1.0, "count": 1}

    test2015 = [replace(questions[0], question_id=i, line=n) for n, i in enumerate([7, 11, 5, 3], 1)]
    dev = [replace(questions[0], question_id=i, line=n) for n, i in enumerate([11, 3], 1)]
    assert vqav2_submission(dev, {1: "Two dogs."}, test2015) == [
        {"question_id": 7, "answer": ""}, {"question_id": 11, "answer": "2 dogs"},
        {"question_id": 5, "answer": ""}, {"question_id": 3, "answer": ""}]
    with pytest.raises(DataError, match="question_id 3 is not in --submission-questions"):
        vqav2_submission(dev, {}, test2015[:2])


def test_a_question_set_is_read_one_way_and_named_as_the_user_typed_it(tmp_path):
    """`megamod eval` and `eval.tasks` read a question set with the same code: the same
    questions, ground truth and checks; errors name the flags (`--annotations a.json`) or
    the entry's keys (`eval.tasks[2] (pope): a.json`, `eval.tasks[2].annotations`), never
    the other's."""
    flags, entry = InputNames(), InputNames("eval.tasks[2]")
    (tmp_path / "a.png").write_bytes(b"")  # only whether the image is there matters here
    lines = [{"question_id": i, "image": "a.png" if i != 2 else "gone.png", "text": "Is it?",
              "category": "random"} for i in (1, 2, 3, 4)]
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in lines))
    labels = tmp_path / "coco_pope_random.json"
    labels.write_text("".join(json.dumps({"question_id": n, "label": l}) + "\n"
                              for n, l in enumerate(["yes", "no", "no", "yes"], 1)))

    def load(names: InputNames, annotations: list[Path], task: str = "pope", **kwargs):
        return load_question_set(TASKS[task], questions, tmp_path, annotations, tmp_path / "scratch",
                                 names, **kwargs)

    # the first 3 questions, of which the second's image is missing: 1 and 3 asked, with their labels
    question_set = load(entry, [labels], limit=3)
    assert [q.question_id for q in question_set.questions] == [1, 3] and question_set.missing_images == 1
    assert [t["label"] for t in question_set.truth] == ["yes", "no"]
    assert question_set.score({0: "Yes", 1: "Yes"}) == TASKS["pope"].score(
        ["Yes", "Yes"], question_set.truth, question_set.questions)

    def refused(names: InputNames, annotations: list[Path], **kwargs) -> str:
        with pytest.raises(DataError) as error:
            load(names, annotations, **kwargs)
        return str(error.value)

    assert "give --annotations with the pope ground truth" in refused(flags, [])
    message = refused(entry, [])
    assert message.startswith("eval.tasks[2] (pope): ") and "give eval.tasks[2].annotations with" in message
    broken = tmp_path / "coco_pope_popular.json"
    broken.write_text("3")
    assert refused(flags, [broken]).startswith(f"--annotations {broken}: neither a list")
    message = refused(entry, [broken])
    assert message.startswith(f"eval.tasks[2] (pope): {broken}: neither a list") and "--" not in message
    assert f"eval.tasks[2].annotations[1]={tmp_path / 'nope.json'} is not a file" in \
        refused(entry, [labels, tmp_path / "nope.json"])
    # VQAv2's submission questions are named as such, not as --questions
    empty = tmp_path / "test2015.jsonl"
    empty.write_text("")
    assert refused(flags, [], task="vqav2", submission_questions=empty).startswith(
        f"--submission-questions {empty}: no questions")
    # a question with two images: refused for both
    questions.write_text(json.dumps({**lines[0], "text": "<image> or <image>?"}) + "\n")
    assert f"{questions}:1: <image> appears more than once" in refused(entry, [labels])
