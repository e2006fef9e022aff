"""bf16 and fp16 through megatron-core's mixed-precision path on CPU, and FP8's selection.

One 2-process launch (parallel_worker.py precision, in tests/training/conftest.py's)
trains 8 steps at TP=1 (DP=2) in fp32, bf16 and fp16, and in bf16 at TP=2 + SP, with a NaN
injected into one gradient of rank 1 at step 4. fp32 is the reference: mixed precision
must follow its losses; bf16 at TP=2 + SP must follow bf16 at TP=1. In fp16 the injected
NaN is an overflow: the loss scale halves and the step is skipped without counting as a
failure. FP8's selection logic is pure and tested with the machines it describes; on this
CPU the CLI refuses it.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from megamod.config import load_config
from megamod.precision import fp8_fields, fp8_refusal
from tests.launcher import TINY_CONFIG, free_port, run

STEPS, NAN_AT = 8, 4  # parallel_worker.PRECISION_STEPS, PRECISION_NAN_AT
BEFORE, FROM = NAN_AT - 1, STEPS - NAN_AT + 1  # steps before the NaN, and from it on
RUNS = ("fp32_tp1", "bf16_tp1", "fp16_tp1", "bf16_tp2")


@pytest.fixture(scope="module")
def results(worker_outputs):
    return {name: torch.load(worker_outputs / "parallel" / f"precision_{name}.pt") for name in RUNS}


def column(result: dict, key: str) -> list[float]:
    return [step[key] for step in result["steps"]]


# Largest relative difference of a step's loss from fp32's over the 8 steps (the NaN step's
# included), measured: bf16 TP=1 1.68e-3, fp16 1.87e-4, bf16 TP=2 + SP 6.97e-4 (the
# differences grow after a few updates). Tolerances ~1.8x.
LOSS_RTOL = {"bf16_tp1": 3e-3, "fp16_tp1": 3.5e-4, "bf16_tp2": 1.3e-3}


@pytest.mark.parametrize("name", ["bf16_tp1", "fp16_tp1", "bf16_tp2"])
def test_mixed_precision_trains_like_fp32(results, name):
    result, reference = results[name], results["fp32_tp1"]
    dtype = "torch.bfloat16" if name.startswith("bf16") else "torch.float16"
    assert result["param_dtypes"] == [dtype]
    assert result["main_param_dtypes"] == ["torch.float32"]  # Adam on fp32 main params
    losses = column(result, "train/loss")
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 0.8, "the loss should clearly fall"  # measured: by 1.38
    assert losses == pytest.approx(column(reference, "train/loss"), rel=LOSS_RTOL[name])
    assert column(result, "train/lr") == column(reference, "train/lr")  # the same schedule


def test_bf16_tp2_sp_matches_bf16_tp1(results):
    tp2, tp1 = results["bf16_tp2"], results["bf16_tp1"]
    # Measured: at most 1.16e-3 relative.
    assert column(tp2, "train/loss") == pytest.approx(column(tp1, "train/loss"), rel=2e-3)
    assert set(tp2["grads"]) == set(tp1["grads"])
    for name, grad in tp1["grads"].items():
        assert grad.abs().sum() > 0, f"{name} got no gradient"
        # bf16 rounds to 3 significant digits; measured at most 0.98 % per tensor (bf16
        # TP=1 differs from fp32 by up to 1.4 %). A TP/SP mistake (a missing or doubled
        # reduction) is 50 %+.
        relative = ((tp2["grads"][name] - grad).norm() / grad.norm()).item()
        assert relative < 0.02, f"{name}: {relative:.3g}"


@pytest.mark.parametrize("name", ["fp32_tp1", "bf16_tp1", "bf16_tp2"])
def test_a_nan_is_skipped_in_every_precision(results, name):
    steps = results[name]["steps"]
    assert column(results[name], "train/skipped_steps") == [0] * BEFORE + [1] * FROM
    assert math.isnan(steps[NAN_AT - 1]["train/grad_norm"])
    assert steps[NAN_AT]["train/lr"] == steps[NAN_AT - 1]["train/lr"]  # no schedule step


def test_fp16_overflow_backs_the_loss_scale_off(results):
    result = results["fp16_tp1"]
    steps = result["steps"]
    # initial_loss_scale=1024, hysteresis=1: halved at the overflow, steady otherwise.
    assert column(result, "train/loss_scale") == [1024.0] * BEFORE + [512.0] * FROM
    assert column(result, "train/overflow_steps") == [0] * BEFORE + [1] * FROM
    assert column(result, "train/skipped_steps") == [0] * STEPS, "an overflow is not a failure"
    assert math.isnan(steps[NAN_AT - 1]["train/grad_norm"])
    assert steps[NAN_AT]["train/lr"] == steps[NAN_AT - 1]["train/lr"]


HOPPER, AMPERE, BLACKWELL = (9, 0), (8, 0), (10, 0)


@pytest.mark.parametrize(
    "overrides, te_version, capability, words",
    [
        ([], None, None, ["transformer-engine", "GPU", "no GPU", "precision.fp8=null"]),
        ([], (2, 8), AMPERE, ["Hopper", "8.0", "precision.fp8=null"]),
        ([], None, HOPPER, ["transformer-engine", "does not import", "pip install"]),
        (["precision.fp8_recipe=mxfp8"], (2, 8), HOPPER, ["Blackwell", "9.0", "fp8_recipe=delayed"]),
        (["precision.fp8_recipe=blockwise"], (2, 2), HOPPER, ["transformer-engine >= 2.3", "2.2"]),
        ([], (2, 8), HOPPER, None),
        (["precision.fp8_recipe=tensorwise"], (2, 2), HOPPER, None),
        (["precision.fp8_recipe=mxfp8"], (2, 8), BLACKWELL, None),
    ],
)
def test_fp8_runs_only_with_transformer_engine_on_hopper(overrides, te_version, capability, words):
    precision = load_config(TINY_CONFIG, ["precision.params_dtype=bf16", "precision.fp8=hybrid",
                                          *overrides]).precision
    reason = fp8_refusal(precision, te_version, capability)
    if words is None:
        assert reason is None
    else:
        assert reason is not None and all(w in reason for w in words), reason


def test_fp8_reaches_the_decoder_only():
    from megamod.models.transformer_configs import transformer_configs

    config = load_config(TINY_CONFIG, [
        "precision.params_dtype=bf16", "precision.fp8=hybrid", "precision.fp8_recipe=tensorwise",
        "precision.fp8_amax_history_len=16", "precision.fp8_amax_compute_algo=max"])
    configs = transformer_configs(config)
    language = configs.language
    assert (language.fp8, language.fp8_recipe) == ("hybrid", "tensorwise")
    assert (language.fp8_amax_history_len, language.fp8_amax_compute_algo) == (16, "max")
    assert language.bf16 and not language.first_last_layers_bf16
    # The vision encoder and projector keep bf16 (ViT token counts miss FP8 GEMM shapes).
    assert configs.vision.fp8 is None and configs.projector.fp8 is None
    assert configs.vision.bf16 and configs.projector.bf16
    assert fp8_fields(load_config(TINY_CONFIG, ["precision.params_dtype=bf16"])) == {}


@pytest.mark.parametrize("dispatcher, padded", [("alltoall", True), ("allgather", False)])
def test_fp8_pads_expert_inputs_in_the_router_where_upstream_can(dispatcher, padded):
    # TransformerConfig with MoE + fp8 asks transformer-engine's version: fields only here.
    config = load_config(TINY_CONFIG, ["precision.params_dtype=bf16", "precision.fp8=e4m3",
                                       "moe.num_experts=4", f"moe.token_dispatcher_type={dispatcher}"])
    fields = fp8_fields(config)
    assert fields["fp8"] == "e4m3"
    # allgather: TEGroupedMLP pads expert inputs itself (Fp8Padding) whenever fp8 is set.
    assert fields.get("moe_router_padding_for_quantization", False) is padded


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's refusal")
def test_fp8_is_refused_on_cpu_with_exit_2(tmp_path):
    result = run([sys.executable, "-m", "megamod", "train", str(TINY_CONFIG), "precision.fp8=hybrid",
                  "checkpoint.save_dir=null", "checkpoint.save_interval=null",
                  "logging.tensorboard_dir=null"],
                 cwd=tmp_path, extra_env={"MASTER_PORT": str(free_port())})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "transformer-engine" in result.stderr and "GPU" in result.stderr
    assert "Traceback" not in result.stderr
