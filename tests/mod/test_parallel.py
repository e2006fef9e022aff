"""MoD under sequence parallelism chooses exactly the tokens it chooses without it, and
gives the loss and every gradient of one process: p-MoD's PRD on the tiny decoder (layers
1-3 keep 75 / 25 / 15 % of the vision tokens) with random router weights, on micro-batches
mixing text-only, one-image and two-image samples; dense MoD at TP=2 + SP, and MoD with
MoE layers on packed rows at TP=2 + SP + EP=2. fp32 on CPU.
"""

from __future__ import annotations

import pytest
import torch

from tests.launcher import REPO, parallel_worker_results

WORKER = REPO / "tests" / "mod" / "parallel_worker.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return parallel_worker_results(WORKER, ("mod", "mod_moe"), tmp_path_factory.mktemp("mod_grads"))


@pytest.mark.parametrize("variant", ["mod", "mod_moe"])
def test_tp2_sp_matches_single_process(results, variant):
    reference, other = results[f"grads_{variant}_ref"], results[f"grads_{variant}_tp2"]
    # The same tokens were kept in every layer (the kept share would differ otherwise).
    kept = {k: v for k, v in reference["kept"].items() if k.startswith("mod/kept_ratio/")}
    assert kept == {f"mod/kept_ratio/layer{i}": pytest.approx(r, abs=0.03)
                    for i, r in ((1, 0.75), (2, 0.25), (3, 0.15))}
    assert other["kept"] == pytest.approx(reference["kept"], rel=1e-5)
    assert other["tokens"] == reference["tokens"] > 0
    assert other["loss"] == pytest.approx(reference["loss"], abs=1e-5)
    assert other["disagreeing"] == [], "replicas on different ranks disagree"
    assert set(other["grads"]) == set(reference["grads"])
    routers = [n for n in reference["grads"] if ".mod_router." in n]
    assert len(routers) == 6  # weight and bias of layers 1, 2, 3
    for name, ref_grad in reference["grads"].items():
        # The last layer's vision outputs reach no loss token: its router learns nothing.
        if ".layers.3.mod_router." not in name:
            assert ref_grad.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(other["grads"][name], ref_grad, atol=1e-5, rtol=1e-4, msg=name)
