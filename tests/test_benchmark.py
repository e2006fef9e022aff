"""benchmarks/run.py end to end on the tiny model: its JSON, and a FLOPs ratio that is
megamod.training.flops' own for the same configs and samples. No timing is asserted."""

from __future__ import annotations

import json
import sys

import pytest

from megamod.config import load_config
from megamod.training.flops import Sample, sample_flops
from tests.launcher import REPO, check, run


def test_benchmark_smoke_json() -> None:
    cmd = [sys.executable, "benchmarks/run.py", "--smoke", "--warmup", "1", "--steps", "1",
           "--variants", "dense,mod,hf", "--json"]
    result = json.loads(check(run(cmd, REPO, timeout=120)).stdout.strip().splitlines()[-1])

    assert set(result["variants"]) == {"dense", "mod", "hf"}
    for numbers in result["variants"].values():
        assert {"step_time_s", "tokens_per_s", "tflops_per_step", "tflops_per_s"} <= numbers.keys()
        assert numbers["step_time_s"] > 0
    assert set(result["ratios"]) == {
        "ratio_mod_vs_dense", "ratio_megamod_vs_hf", "flops_ratio", "kv_cache_ratio"
    }

    base = REPO / "examples" / "configs" / "tiny.yaml"
    configs = {name: load_config(base, result["overrides"][name]) for name in ("dense", "mod")}
    seq_length = configs["dense"].model.language.seq_length
    samples = [Sample(images, seq_length) for images in result["images_per_sample"]]
    flops = {
        name: sum(sample_flops(config, sample, result["vocab_size"]) for sample in samples)
        for name, config in configs.items()
    }
    assert result["ratios"]["flops_ratio"] == pytest.approx(flops["mod"] / flops["dense"], rel=1e-12)
    variants = result["variants"]
    assert variants["hf"]["tflops_per_step"] == variants["dense"]["tflops_per_step"]
