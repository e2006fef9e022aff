"""TP=2 with sequence parallelism and DP=2 give the loss and gradients of TP=1, DP=1.

One 2-process launch computes one step's gradients at TP=2+SP (DP=1) and at TP=1 (DP=2,
half the micro-batches each); one 1-process launch is the reference (4 micro-batches).
Both are tests/training/conftest.py's (the 2-process one runs the other modules' workers
too). All through the real path: setup() -> megatron-core DDP -> forward_backward schedule ->
finalize_model_grads. fp32 on CPU.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def results(worker_outputs):
    return {p.stem: torch.load(p) for p in (worker_outputs / "parallel").glob("grads_*.pt")}


@pytest.mark.parametrize("layout", ["grads_tp2_sp1_dp1", "grads_tp1_sp0_dp2"])
def test_loss_and_gradients_match_single_process(results, layout):
    reference, other = results["grads_tp1_sp0_dp1"], results[layout]
    assert other["tokens"] == reference["tokens"] > 0
    assert other["loss"] == pytest.approx(reference["loss"], abs=1e-5)
    assert set(other["grads"]) == set(reference["grads"])
    for name, ref_grad in reference["grads"].items():
        assert ref_grad.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(other["grads"][name], ref_grad, atol=1e-5, rtol=1e-4, msg=name)


def test_tensor_parallel_ranks_use_one_set_of_batches(worker_outputs):
    """The TP ranks of a DP rank build their batches independently: images one of them
    decoded otherwise (DALI's Pillow fallback) become the first rank's, tokens that differ
    (a sample only one could read) stop the run, naming the cause."""
    ranks = [torch.load(worker_outputs / "parallel" / f"agreement_rank{r}.pt") for r in range(2)]
    for result in ranks:
        assert result["fingerprint_is_the_batches"] and result["warned_when_alike"] == 0
        assert result["warned_when_different"] == 1
        for agreed, first in zip(result["images"], ranks[0]["decoded"]):
            assert torch.equal(agreed.cpu(), first)
        assert "tensor-parallel ranks" in result["refused"]
        assert "built different batches" in result["refused"]
    assert not torch.equal(ranks[1]["decoded"][0], ranks[0]["decoded"][0])  # rank 1 differed
