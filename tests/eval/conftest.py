"""Shared by tests/eval/test_distributed.py and test_lmms_eval.py: the tiny chain's stage-3
model (`moe_llava/tiny_stage3.yaml`: MoE layers with MoE-LLaVA's gate, which draws
Gumbel noise at evaluation too), trained one step from scratch instead of through stages
1-2 (its answers are nonsense, but differ by question); a POPE-format, a ScienceQA-format
and an MMBench-format set over skimage's pictures; and `megamod eval` on all three in one
process (`eval_tasks.py`), the reference both tests compare with.
"""

from __future__ import annotations

import base64
import csv
import json
import sys
from pathlib import Path

import pytest

from tests.launcher import REPO, check, free_port, megamod_train, run

STAGE3 = REPO / "examples" / "configs" / "moe_llava" / "tiny_stage3.yaml"
PICTURES = ("astronaut", "chelsea", "coffee", "rocket")

POPE = [
    {"question_id": 1, "image": "astronaut.png", "text": "Is there a person in the image?",
     "category": "adversarial", "label": "yes"},
    {"question_id": 2, "image": "chelsea.png", "text": "Is there a cat in the image?",
     "category": "popular", "label": "yes"},
    {"question_id": 3, "image": "coffee.png", "text": "Is there a person in the image?",
     "category": "random", "label": "no"},
    {"question_id": 4, "image": "rocket.png", "text": "Is there a rocket in this picture?",
     "category": "random", "label": "yes"},
    {"question_id": 5, "image": "missing.png", "text": "Is there a dog in the image?",
     "category": "popular", "label": "no"},
    {"question_id": 6, "image": "chelsea.png", "text": "Is there a dog in the image?",
     "category": "adversarial", "label": "no"},
]
SCIENCEQA = [
    {"question_id": "sqa1", "image": "astronaut.png",
     "text": "What is the person wearing?\nA. a space suit\nB. a swimsuit"},
    {"question_id": "sqa2", "image": "coffee.png",
     "text": "Context: a table.\nWhat is in the cup?\nA. tea\nB. coffee\nC. milk"},
    {"question_id": "sqa3", "image": "rocket.png", "text": "Which is shown?\nA. a rocket\nB. a boat"},
]
PROBLEMS = {"sqa1": {"choices": ["a space suit", "a swimsuit"], "answer": 0},
            "sqa2": {"choices": ["tea", "coffee", "milk"], "answer": 1},
            "sqa3": {"choices": ["a rocket", "a boat"], "answer": 0}}
MMBENCH_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
                  "source", "l2-category", "comment", "split"]


def png_base64(root: Path, name: str) -> str:
    return base64.b64encode((root / "images" / f"{name}.png").read_bytes()).decode()


def write_benchmark_files(root: Path) -> None:
    """POPE and ScienceQA sets (POPE's fifth image missing) and an MMBench dev TSV (its
    fourth row's image undecodable) over skimage's pictures, under `root`."""
    import numpy as np
    import skimage.data
    from PIL import Image

    (root / "images").mkdir()
    for name in PICTURES:
        Image.fromarray(np.asarray(getattr(skimage.data, name)())).save(root / "images" / f"{name}.png")
    (root / "pope.jsonl").write_text("".join(json.dumps(q) + "\n" for q in POPE))
    (root / "scienceqa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in SCIENCEQA))
    (root / "problems.json").write_text(json.dumps(PROBLEMS))
    rows = [
        [0, "What animal is this?", "nan", "a dog", "a cat", "a bird", "a fish", "B", "recognition",
         png_base64(root, "chelsea"), "src", "perception", "nan", "dev"],
        [1, "Is this a drink?", "Look at the table.", "yes", "no", "nan", "nan", "A", "reasoning",
         png_base64(root, "coffee"), "src", "reasoning", "nan", "dev"],
        [2, "What flies here?", "nan", "a rocket", "a plane", "a kite", "nan", "A", "recognition",
         png_base64(root, "rocket"), "src", "perception", "nan", "dev"],
        [3, "Unreadable?", "nan", "x", "y", "nan", "nan", "A", "recognition", "not base64!", "src",
         "perception", "nan", "dev"],
    ]
    with (root / "mmbench_dev.tsv").open("w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([MMBENCH_HEADER, *rows])


@pytest.fixture(scope="session")
def eval_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_stage3")
    megamod_train(1, ["train.train_iters=1", "checkpoint.load=null", "checkpoint.save_interval=null",
                      "logging.tensorboard_dir=null", f"checkpoint.save_dir={root}/ckpt"], cwd=root, config=STAGE3)
    write_benchmark_files(root)
    return root


WORKER = Path(__file__).with_name("eval_tasks.py")


@pytest.fixture(scope="session")
def single_run(eval_root):
    """`eval_tasks.py` in one process: its output folder `one/` under eval_root, and the result."""
    return check(run([sys.executable, str(WORKER), str(eval_root), str(eval_root / "one")], cwd=eval_root,
                     extra_env={"MASTER_PORT": str(free_port())}))
