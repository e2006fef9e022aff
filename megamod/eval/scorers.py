"""The benchmarks' official scoring rules as pure functions: predictions and ground truth
in, a dict of scores out (fractions in [0, 1], except MME's scores, which are its own
0-200 per subtask).

Each follows its official code; where llava-torch 1.2.2.post1 ships it, the function
cites `llava/eval/<file>:<line>` and `tests/eval/test_scorers.py` runs the official code
on the same inputs. GQA and MME are not in that package: their rules are written from
LLaVA-1.5's `scripts/convert_gqa_for_eval.py` + GQA's `eval.py` and MME's
`eval_tool/calculation.py` as published (not available here to run).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence

from megamod.eval.normalize import normalize_answer

SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")  # eval_science_qa.py:15

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")


# ------------------------------------------------------------------------------ POPE


def pope_yes_no(text: str) -> str:
    """LLaVA's reading of a POPE answer (eval_pope.py:8-20): the first sentence, commas
    removed, split on spaces; "No", "no" or "not" among the words -> "no", else "yes"."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def _binary_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """eval_pope.py:22-61 on one category. A label other than "no" counts as yes (lines
    22-26). Where the official code divides by zero (no yes predicted or none labelled),
    the score is 0."""
    pred = [0 if pope_yes_no(p) == "no" else 1 for p in predictions]
    gold = [0 if label == "no" else 1 for label in labels]
    tp = sum(p == 1 and g == 1 for p, g in zip(pred, gold))
    fp = sum(p == 1 and g == 0 for p, g in zip(pred, gold))
    tn = sum(p == 0 and g == 0 for p, g in zip(pred, gold))
    fn = sum(p == 0 and g == 1 for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(pred), "precision": precision, "recall": recall, "f1": f1,
        "yes_ratio": pred.count(1) / len(pred), "count": len(pred),
    }


def pope(predictions: Sequence[str], labels: Sequence[str], categories: Sequence[str]) -> dict:
    """Per category (adversarial / popular / random: eval_pope.py:74-80 scores each
    annotation file alone) accuracy, precision, recall, F1 and yes-ratio; `f1` is the
    mean F1 over the categories, the figure LLaVA-1.5's paper reports."""
    by_category: dict[str, list[int]] = defaultdict(list)
    for i, category in enumerate(categories):
        by_category[category].append(i)
    per = {
        c: _binary_scores([predictions[i] for i in idx], [labels[i] for i in idx])
        for c, idx in sorted(by_category.items())
    }
    return {"f1": sum(s["f1"] for s in per.values()) / len(per), "categories": per}


# ------------------------------------------------------------------------------ ScienceQA


def scienceqa_letter(text: str) -> str:
    """The option letter of an answer as eval_science_qa.py:65-75 parses it: the whole text
    a letter, "B. ..." , or exactly one "The answer is X." ; else "FAILED"."""
    if text in SCIENCEQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = re.compile(r"The answer is ([A-Z]).").findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def scienceqa(predictions: Sequence[str], answers: Sequence[int], n_choices: Sequence[int]) -> dict:
    """Accuracy: the parsed letter's index (eval_science_qa.py:28-35: a letter beyond the
    question's choices is -1) equal to the answer's index (line 91)."""
    correct = 0
    for text, answer, n in zip(predictions, answers, n_choices):
        letter = scienceqa_letter(text)
        index = SCIENCEQA_OPTIONS.index(letter) if letter in SCIENCEQA_OPTIONS[:n] else -1
        correct += index == answer
    return {"accuracy": correct / len(predictions), "correct": correct, "count": len(predictions)}


# ------------------------------------------------------------------------------ VQA


def vqa_soft_scores(human_answers: Sequence[str]) -> dict[str, float]:
    """m4c_evaluator.py:225-246: for each distinct normalised human answer, min(#other
    humans who gave it / 3, 1) averaged over the 10 leave-one-out subsets of 9."""
    answers = [normalize_answer(a) for a in human_answers]
    scores = {}
    for candidate in set(answers):
        accs = []
        for left_out in range(len(answers)):
            matching = sum(a == candidate for j, a in enumerate(answers) if j != left_out)
            accs.append(min(1.0, matching / 3))
        scores[candidate] = sum(accs) / len(accs)
    return scores


def vqa_accuracy(predictions: Sequence[str], human_answers: Sequence[Sequence[str]]) -> dict:
    """TextVQA's and VQAv2's soft accuracy (m4c_evaluator.py:248-257): the normalised
    prediction's score among the human answers, 0 where no human gave it."""
    scores = [vqa_soft_scores(h).get(normalize_answer(p), 0.0) for p, h in zip(predictions, human_answers)]
    return {"accuracy": sum(scores) / len(scores), "count": len(scores)}


# ------------------------------------------------------------------------------ GQA


def gqa_prediction(text: str) -> str:
    """LLaVA-1.5's `scripts/convert_gqa_for_eval.py`: the answer with trailing periods
    stripped, lower-cased (GQA's answers are lower-case words)."""
    return text.rstrip(".").lower()


def gqa(predictions: Sequence[str], answers: Sequence[str]) -> dict:
    """GQA's `eval.py` accuracy: the prediction equal to the annotated answer."""
    correct = sum(gqa_prediction(p) == a for p, a in zip(predictions, answers))
    return {"accuracy": correct / len(predictions), "correct": correct, "count": len(predictions)}


# ------------------------------------------------------------------------------ MME


def mme_yes_no(text: str) -> str:
    """MME's `calculation.py` `parse_pred_ans`: the answer lower-cased; "yes"/"no" as it
    is, else "yes" or "no" found in its first 4 characters (yes first), else "other"."""
    answer = text.lower()
    if answer in ("yes", "no"):
        return answer
    prefix = answer[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def mme(predictions: Sequence[str], answers: Sequence[str], subtasks: Sequence[str],
        images: Sequence[str]) -> dict:
    """MME's `calculation.py`: per subtask acc (questions right) and acc+ (images with both
    questions right; MME asks two per image), score = (acc + acc+) x 100; perception and
    cognition the sums of their subtasks' scores (only the subtasks present)."""
    by_subtask: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for text, answer, subtask, image in zip(predictions, answers, subtasks, images):
        by_subtask[subtask][image].append(mme_yes_no(text) == answer.lower())
    per = {}
    for subtask, by_image in sorted(by_subtask.items()):
        right = [r for rs in by_image.values() for r in rs]
        acc = sum(right) / len(right)
        acc_plus = sum(all(rs) for rs in by_image.values()) / len(by_image)
        per[subtask] = {"acc": acc * 100, "acc_plus": acc_plus * 100,
                        "score": (acc + acc_plus) * 100, "count": len(right)}
    return {
        "perception": sum(s["score"] for t, s in per.items() if t in MME_PERCEPTION),
        "cognition": sum(s["score"] for t, s in per.items() if t in MME_COGNITION),
        "subtasks": per,
    }
