"""`lmms-eval --model megamod --model_args checkpoint=CKPT_DIR` as a user runs it, offline:
a local task (a YAML with its `utils.py`, parquet data made from skimage's pictures, as
`datasets` writes it) over conftest.py's POPE questions; the answers must be the ones
`megamod eval` gave the same prompts and images (both one question a batch), and the
score the task's metric on them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megamod.eval import scorers
from megamod.eval.tasks import SHORT_ANSWER
from tests.eval.conftest import POPE
from tests.launcher import check, run

TASK = """\
task: megamod_local_pope
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: label
generation_kwargs:
  max_new_tokens: 6
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
"""
UTILS = f"""\
from megamod.eval.scorers import pope_yes_no


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    return doc["question"] + {SHORT_ANSWER!r}


def process_results(doc, results):
    return {{"accuracy": float(pope_yes_no(results[0]) == doc["label"])}}
"""


def test_lmms_eval_runs_the_megamod_model(eval_root, single_run, tmp_path):
    import datasets
    from PIL import Image

    asked = [q for q in POPE if (eval_root / "images" / q["image"]).is_file()]
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "label": datasets.Value("string")})
    datasets.Dataset.from_dict(
        {"image": [Image.open(eval_root / "images" / q["image"]) for q in asked],
         "question": [q["text"] for q in asked], "label": [q["label"] for q in asked]},
        features=features,
    ).to_parquet(tmp_path / "pope.parquet")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "megamod_local_pope.yaml").write_text(TASK.format(data=tmp_path / "pope.parquet"))
    (tmp_path / "tasks" / "utils.py").write_text(UTILS)

    lmms_eval = Path(sys.executable).with_name("lmms-eval")
    check(run([str(lmms_eval), "--model", "megamod", "--model_args", f"checkpoint={eval_root / 'ckpt'}",
               "--tasks", "megamod_local_pope", "--include_path", "tasks", "--batch_size", "1",
               "--output_path", "out", "--log_samples"], cwd=tmp_path, timeout=600,
              extra_env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}))

    [samples_file] = (tmp_path / "out").rglob("*samples_megamod_local_pope.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()),
                     key=lambda s: s["doc_id"])
    responses = [s["filtered_resps"] for s in samples]
    responses = [r[0] if isinstance(r, list) else r for r in responses]
    reference = [json.loads(line)["text"]
                 for line in (eval_root / "one" / "pope.jsonl").read_text().splitlines()]
    assert responses == reference

    [results_file] = (tmp_path / "out").rglob("*_results.json")
    results = json.loads(results_file.read_text())
    expected = sum(scorers.pope_yes_no(r) == q["label"] for r, q in zip(responses, asked)) / len(asked)
    assert results["results"]["megamod_local_pope"]["accuracy,none"] == expected
    assert results["config"]["model"] == "megamod"
