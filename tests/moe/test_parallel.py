"""Expert parallelism gives the loss and gradients of one process (megatron-core's MoE
layers, our router, aux + z losses on), dropless and with a capacity.

Reference: one process, TP=1, EP=1, 4 micro-batches. Others (2 processes, each loading
the reference's initial weights): EP=2 (DP=2), EP=2 with TP=2 + SP (ETP=1), TP=2 + SP.
fp32 on CPU, through setup() -> megatron-core DDP -> the schedule -> finalize_model_grads.
"""

from __future__ import annotations

import pytest
import torch

CASES = ["dropless_ep2", "dropless_tp2_sp_ep2", "dropless_tp2_sp", "capacity_ep2"]


@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients_match_single_process(moe_parallel_results, case):
    variant = case.split("_")[0]
    reference = moe_parallel_results[f"grads_{variant}_ref"]
    other = moe_parallel_results[f"grads_{case}"]
    assert other["tokens"] == reference["tokens"] > 0
    assert other["loss"] == pytest.approx(reference["loss"], abs=1e-5)
    assert other["disagreeing"] == [], "replicas on different ranks disagree"
    assert set(other["grads"]) == set(reference["grads"])
    experts = [n for n in reference["grads"] if "local_experts.3." in n]
    routers = [n for n in reference["grads"] if n.endswith("router.weight")]
    assert experts and len(routers) == 2  # MoE on layers 0 and 2 of 4
    for name, ref_grad in reference["grads"].items():
        assert ref_grad.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(other["grads"][name], ref_grad, atol=1e-5, rtol=1e-4, msg=name)
