"""benchmarks/run.py end to end on the tiny model: its JSON, a FLOPs ratio that is
megamod.training.flops' own for the same configs and samples, and ratios that are what
their definitions say of the reported figures. No timing is asserted."""

from __future__ import annotations

import json
import sys

import pytest

from megamod.config import load_config
from megamod.training.flops import Sample, sample_flops
from tests.launcher import REPO, check, run


def test_benchmark_smoke_json() -> None:
    cmd = [sys.executable, "benchmarks/run.py", "--smoke", "--warmup", "1", "--steps", "1",
           "--variants", "dense,mod,moe,hf", "--loader-steps", "2", "--json"]
    result = json.loads(check(run(cmd, REPO, timeout=120)).stdout.strip().splitlines()[-1])

    assert set(result["variants"]) == {"dense", "mod", "moe", "hf"}
    for numbers in result["variants"].values():
        assert {"step_time_s", "tokens_per_s", "tflops_per_step", "tflops_per_s"} <= numbers.keys()
        assert numbers["step_time_s"] > 0
    ratios, variants = result["ratios"], result["variants"]
    assert set(ratios) == {
        "ratio_mod_vs_dense", "ratio_moe_vs_dense", "ratio_moe_vs_dense_per_flop",
        "ratio_megamod_vs_hf", "flops_ratio", "kv_cache_ratio", "ratio_loader_vs_step",
        "ratio_mod_vs_dense_prefill", "ratio_mod_vs_dense_decode",
        *(f"{key}_b{batch}" for batch in (1, 8) for key in (
            "ratio_mod_vs_dense_prefill", "ratio_mod_vs_dense_decode", "kv_cache_ratio_measured")),
    }
    time_per_flop = {name: variants[name]["step_time_s"] / variants[name]["tflops_per_step"]
                     for name in ("moe", "dense")}
    assert ratios["ratio_moe_vs_dense_per_flop"] == pytest.approx(
        time_per_flop["moe"] / time_per_flop["dense"], rel=1e-12)

    # The loader figure: images the loader delivered per second against the images of the
    # dense step's samples per second of its step time.
    loader = result["loader"]
    assert loader["decoder"] in {"DaliImageDecoder", "PythonImageDecoder"}
    assert loader["images"] > 0 and loader["images_per_s"] > 0
    step_images = sum(result["images_per_sample"]) / variants["dense"]["step_time_s"]
    assert loader["step_images_per_s"] == pytest.approx(step_images, rel=1e-12)
    assert ratios["ratio_loader_vs_step"] == pytest.approx(
        loader["images_per_s"] / step_images, rel=1e-12)

    # The HF peer holds the dense model's weights (megamod convert's adapter): same loss.
    losses = result["same_weights_loss"]
    assert losses["hf"] == pytest.approx(losses["megamod"], rel=1e-5)

    # Generation: dense and MoD at batch 1 and 8; the ratios are the reported numbers'.
    generation = result["generation"]
    assert set(generation) == {f"{name}/b{batch}" for name in ("dense", "mod") for batch in (1, 8)}
    for batch in (1, 8):
        mod, dense = generation[f"mod/b{batch}"], generation[f"dense/b{batch}"]
        assert mod["prefill_s"] > 0 and dense["decode_token_s"] > 0
        assert 0 < mod["kv_cache_bytes"] < dense["kv_cache_bytes"]  # PRD: 1 of the 2 layers
        assert ratios[f"ratio_mod_vs_dense_decode_b{batch}"] == pytest.approx(
            mod["decode_token_s"] / dense["decode_token_s"], rel=1e-12)
    assert ratios["ratio_mod_vs_dense_prefill"] == ratios["ratio_mod_vs_dense_prefill_b8"]

    base = REPO / "examples" / "configs" / "tiny.yaml"
    configs = {name: load_config(base, result["overrides"][name]) for name in ("dense", "mod")}
    seq_length = configs["dense"].model.language.seq_length
    samples = [Sample(images, seq_length) for images in result["images_per_sample"]]
    flops = {
        name: sum(sample_flops(config, sample, result["vocab_size"]) for sample in samples)
        for name, config in configs.items()
    }
    assert ratios["flops_ratio"] == pytest.approx(flops["mod"] / flops["dense"], rel=1e-12)
    assert variants["hf"]["tflops_per_step"] == variants["dense"]["tflops_per_step"]
