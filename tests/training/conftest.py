"""The training package's worker runs, made once for the package: a launch costs ~10 s of
imports a rank on 2 cores, so each process count is launched once and its ranks run every
worker script of that size one after another (tests.launcher.launch_scripts; each script
rebuilds megatron-core's parallel state):

- 2 processes: distopt_worker.py dp2 (its checkpoints are what the later launches load),
  parallel_worker.py agreement, grads and precision, test_recompute.py's and
  test_plan.py's workers (the last: it ends the process group);
- 1 process: the references, parallel_worker.py grads and pipeline_worker.py init, and
  distopt_worker.py dp1;
- 4 processes: pipeline_worker.py grads and distopt_worker.py four.

For test_parallel.py, test_precision.py, test_recompute.py, test_plan.py,
test_pipeline.py and test_distributed_optimizer.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.launcher import REPO, launch_scripts

TRAINING = REPO / "tests" / "training"
PARALLEL, PIPELINE, DISTOPT = (TRAINING / f"{name}_worker.py" for name in ("parallel", "pipeline", "distopt"))


@pytest.fixture(scope="package")
def worker_outputs(tmp_path_factory) -> Path:
    """The workers' files, a folder each: parallel/ (grads_*.pt, agreement_rank*.pt,
    precision_*.pt), recompute/recompute_tp2.pt, plan/rank*.json, pipeline/ (grads_*.pt)
    and distopt/ (*_rank*.pt)."""
    out = tmp_path_factory.mktemp("training_workers")
    parallel, recompute, plan, pipeline, distopt = (
        out / name for name in ("parallel", "recompute", "plan", "pipeline", "distopt"))
    for folder in (parallel, recompute, plan, pipeline, distopt):
        folder.mkdir()
    launch_scripts(2, [[DISTOPT, "dp2", distopt],
                       *([PARALLEL, mode, parallel] for mode in ("agreement", "grads", "precision")),
                       [TRAINING / "test_recompute.py", recompute], [TRAINING / "test_plan.py", plan]],
                   cwd=out, timeout=900)
    launch_scripts(1, [[PARALLEL, "grads", parallel], [PIPELINE, "init", pipeline], [DISTOPT, "dp1", distopt]],
                   cwd=out, timeout=900)
    launch_scripts(4, [[PIPELINE, "grads", pipeline], [DISTOPT, "four", distopt]], cwd=out, timeout=900)
    return out
