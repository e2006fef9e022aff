"""Pipeline parallelism gives the loss and every gradient of one process: megatron-core's
1F1B schedule over two stages (the vision encoder, projector and embedding on the first,
the output layer and loss on the second, two decoder layers each), for a dense decoder,
MoE with EP=2 (aux + z losses from both stages), MoD (PRD, its layers on both stages) and
MoD + MoE on packed rows; at PP=2 x DP=2 and at TP=2 + SP x PP=2. fp32 on CPU, through
setup() -> megatron-core DDP -> the schedule -> finalize_model_grads.
"""

from __future__ import annotations

import pytest
import torch

from tests.launcher import REPO, torchrun

WORKER = str(REPO / "tests" / "training" / "pipeline_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline_grads")
    torchrun(1, [WORKER, "init", str(out)], cwd=out, timeout=600)
    torchrun(4, [WORKER, "grads", str(out)], cwd=out, timeout=900)
    return {p.stem: torch.load(p) for p in out.glob("grads_*.pt")}


CASES = ["dense_pp2_dp2", "dense_tp2_sp_pp2", "moe_pp2_dp2_ep2", "moe_tp2_sp_pp2_ep2",
         "mod_tp2_sp_pp2", "mod_moe_tp2_sp_pp2_ep2"]


@pytest.mark.parametrize("case", CASES)
def test_pp2_matches_single_process(results, case):
    variant = "mod_moe" if case.startswith("mod_moe") else case.split("_")[0]
    reference, other = results[f"grads_{variant}_ref"], results[f"grads_{case}"]
    assert other["tokens"] == reference["tokens"] > 0
    assert other["loss"] == pytest.approx(reference["loss"], abs=1e-5)
    assert other["disagreeing"] == [], "replicas on different ranks disagree"
    # Every parameter of both stages: the vision encoder's (first) and the output layer's
    # (last) among them, each decoder layer under its global number.
    assert set(other["grads"]) == set(reference["grads"])
    layers = {int(n.split(".")[3]) for n in reference["grads"] if n.startswith("language_model.decoder.layers.")}
    assert layers == {0, 1, 2, 3}
    if "moe" in variant:
        routers = [n for n in reference["grads"] if n.endswith("router.weight") and ".mod_router." not in n]
        assert routers == [f"language_model.decoder.layers.{i}.mlp.router.weight" for i in (0, 2)]
    if variant.startswith("mod"):  # the same tokens kept in every layer, on either stage
        assert other["kept"] == pytest.approx(reference["kept"], rel=1e-5)
        assert {k for k in other["kept"] if k.startswith("mod/kept_ratio/")} == {
            f"mod/kept_ratio/layer{i}" for i in (1, 2, 3)}
    for name, ref_grad in reference["grads"].items():
        # MoD's last layer: its vision outputs reach no loss token, its router learns nothing.
        if ".layers.3.mod_router." not in name:
            assert ref_grad.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(other["grads"][name], ref_grad, atol=1e-5, rtol=1e-4, msg=name)
