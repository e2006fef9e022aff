"""megatron-core's distributed optimizer on CPU with gloo (megamod.cpu_compat): it trains
as the plain optimizer does, and its checkpoints resume at another DP size and across the
two optimizers.

Three launches (tests/training/distopt_worker.py, in tests/training/conftest.py's): 2
processes (DP=2, fp32 and bf16, plain and distributed, STEPS steps each; the distributed
runs save), 1 process (the plain optimizer resumes them at DP=1, and saves again), 4
processes (TP=2 + SP at DP=2; MoE with EP=2, so experts shard over their expert-DP group
of 2 and the rest over DP=4; the distributed optimizer resumes both checkpoints at DP=4).
The reference for each distributed run is the plain optimizer's run of the same layout in
the same launch: its Adam state is megatron-core's `FP32Optimizer` /
`Float16OptimizerWithFloat16Params`, whose DP=2 gradients tests/training/test_parallel.py
checks against one process.
"""

from __future__ import annotations

import inspect

import pytest
import torch

ADAM = ("param", "exp_avg", "exp_avg_sq")


@pytest.fixture(scope="module")
def results(worker_outputs):
    return {p.stem: torch.load(p) for p in (worker_outputs / "distopt").glob("*_rank*.pt")}


def max_differences(run: dict, reference: dict) -> dict[str, float]:
    """Largest |difference| over all model parameters, and over each Adam tensor."""
    assert run["params"].keys() == reference["params"].keys()
    assert run["adam"].keys() == reference["adam"].keys() and run["adam"]
    result = {"model": max((run["params"][n] - reference["params"][n]).abs().max().item()
                           for n in reference["params"])}
    for key in ADAM:
        result[key] = max((run["adam"][n][key] - reference["adam"][n][key]).abs().max().item()
                          for n in reference["adam"])
    return result


def test_the_upstream_spots_the_patches_answer_exist():
    """cpu_compat's distributed-optimizer patches answer these lines of megatron-core 0.16.1."""
    from megatron.core.optimizer import distrib_optimizer

    # The file, not the live functions: cpu_compat may already have wrapped those.
    source = inspect.getsource(distrib_optimizer)
    assert "model_param.type() == 'torch.cuda.FloatTensor'" in source
    assert 'dst_tensors = {"param": main_param, **optim_state}' in source
    assert "dst_tensors[key].copy_(tensors[key])" in source
    assert 'if k == "step":' in source
    # megamod.models.upstream_fixes gives each parameter its own copy of this count.
    assert 's["step"] = step\n' in source


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_distributed_optimizer_trains_as_the_plain_one_at_dp2(results, dtype):
    for rank in (0, 1):
        runs = results[f"dp2_rank{rank}"]
        plain, dist = runs[f"{dtype}_plain"], runs[f"{dtype}_dist"]
        assert plain["optimizers"] == [
            "FP32Optimizer" if dtype == "fp32" else "Float16OptimizerWithFloat16Params"]
        assert dist["optimizers"] == ["DistributedOptimizer"] and dist["shards"] == [2]
        assert plain["dtypes"] == dist["dtypes"] == [
            "torch.float32" if dtype == "fp32" else "torch.bfloat16"]
        # fp32: the parameters differ by rounding (below), so later losses may by a few
        # ulps (measured: 2.2e-7 relative at step 3, 3 ulps of a loss of 6.4).
        assert dist["losses"] == pytest.approx(plain["losses"], rel=1e-6)
        assert dist["grad_norms"] == pytest.approx(plain["grad_norms"], rel=1e-6)
        diff = max_differences(dist, plain)
        if dtype == "fp32":
            # Measured: 2.8e-7 (the clipping coefficient's norm is summed per DP shard).
            assert max(diff.values()) < 1e-6, diff
        else:
            # Unclipped, the update is elementwise on the same gradients: bit-identical.
            assert max(diff.values()) == 0.0, diff
        assert all(v["exp_avg_sq"].max() > 0 for v in dist["adam"].values())  # all trained


@pytest.mark.parametrize("layout", ["tp2", "moe"])
def test_distributed_optimizer_trains_as_the_plain_one_with_tp_sp_and_moe(results, layout):
    for rank in range(4):
        runs = results[f"four_rank{rank}"]
        plain, dist = runs[f"{layout}_plain"], runs[f"{layout}_dist"]
        # TP=2 + SP: DP=2. MoE at TP=1: dense params over DP=4, experts (EP=2) over 2.
        assert dist["shards"] == ([2] if layout == "tp2" else [4, 2])
        assert plain["optimizers"] == ["FP32Optimizer"] * len(dist["shards"])
        # fp32: the parameters differ by rounding (below), so later losses may by a few
        # ulps (measured: 2.2e-7 relative at step 3, 3 ulps of a loss of 6.4).
        assert dist["losses"] == pytest.approx(plain["losses"], rel=1e-6)
        assert dist["grad_norms"] == pytest.approx(plain["grad_norms"], rel=1e-6)
        diff = max_differences(dist, plain)
        assert max(diff.values()) < 1e-6, diff  # measured: 2.2e-7 (TP=2), 1.6e-7 (MoE)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_plain_optimizer_resumes_a_distributed_checkpoint_at_dp1(results, dtype):
    saved = results["dp2_rank0"][f"{dtype}_dist"]
    resumed = results["dp1_rank0"][f"{dtype}_plain_from_dist"]
    assert resumed["iteration"] == 3
    assert resumed["optimizers"] == [
        "FP32Optimizer" if dtype == "fp32" else "Float16OptimizerWithFloat16Params"]
    # Every weight, fp32 main copy and moment as the distributed optimizer held it.
    diff = max_differences(resumed, saved)
    assert max(diff.values()) == 0.0, diff


@pytest.mark.parametrize("source", ["dist_dp2", "plain_dp1"])
def test_distributed_optimizer_resumes_at_dp4(results, source):
    """A DP=2 distributed checkpoint, and the plain DP=1 one re-saved from it, both load
    into the distributed optimizer sharded over DP=4."""
    saved = results["dp2_rank0"]["fp32_dist"]
    for rank in range(4):
        resumed = results[f"four_rank{rank}"][f"dist_dp4_from_{source}"]
        assert resumed["iteration"] == 3 and resumed["shards"] == [4]
        # Each parameter counts its own Adam steps (upstream shares one count among all).
        assert resumed["steps_after_an_update"] == [4.0]
        diff = max_differences(resumed, saved)
        assert max(diff.values()) == 0.0, diff


def test_distributed_optimizer_resumes_a_plain_moe_checkpoint(results):
    """The plain fp32 optimizer saves no main params (they are the weights): the
    distributed one takes each expert's from that expert's own weights (a MoE layer's
    experts share one key, each at its own place)."""
    saved = results["four_rank0"]["moe_plain"]
    for rank in range(4):
        resumed = results[f"four_rank{rank}"]["moe_dist_from_plain"]
        assert resumed["iteration"] == 3
        diff = max_differences(resumed, results[f"four_rank{rank}"]["moe_plain"])
        assert max(diff.values()) == 0.0, diff
    assert any("local_experts.1.linear_fc1" in n for n in saved["params"])
