"""`megamod eval` on several tasks in one process (one launch under torchrun for all of
them): `python eval_tasks.py ROOT OUT_DIR`, each task's files under ROOT as
test_distributed.py writes them. Calls `megamod.__main__.main`, what the console script runs;
under torchrun in the process group made here, which `megamod eval` keeps."""

import os
import sys

import torch

from megamod.__main__ import main

root, out = sys.argv[1], sys.argv[2]
if int(os.environ.get("WORLD_SIZE", 1)) > 1:
    # one process group for the three runs: torch cannot make a second one over torchrun's store
    torch.distributed.init_process_group("gloo")
RUNS = {
    "pope": ["--questions", f"{root}/pope.jsonl", "--images", f"{root}/images"],
    "scienceqa_img": ["--questions", f"{root}/scienceqa.jsonl", "--images", f"{root}/images",
                      "--annotations", f"{root}/problems.json"],
    "mmbench": ["--questions", f"{root}/mmbench_dev.tsv"],
}
# POPE one question a batch: test_lmms_eval.py compares lmms-eval's answers (batch size 1)
BATCH_SIZE = {"pope": "1", "scienceqa_img": "2", "mmbench": "2"}
for task, args in RUNS.items():
    code = main(["eval", "--checkpoint", f"{root}/ckpt", "--task", task, *args,
                 "--output", f"{out}/{task}.jsonl", "--max-new-tokens", "6",
                 "--batch-size", BATCH_SIZE[task], "--json"])
    if code:
        sys.exit(code)
