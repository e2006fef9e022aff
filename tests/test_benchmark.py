"""benchmarks/run.py end to end on the tiny model (`--smoke`), its figures against references
made here: the FLOPs it reports for each variant against torch's FLOP counter over the
forward of the models its overrides build, on the micro-batches it stepped; its KV-cache
figures against a count by hand; its Hugging Face peer against the official model (the
same loss before any step, the same FLOPs counted). No timing is asserted."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from megamod.config import load_config
from tests.launcher import REPO, TINY_CONFIG, check, run, world_of_one

GENERATION_TOKENS = 8


@pytest.fixture(scope="module")
def result() -> dict:
    cmd = [sys.executable, "benchmarks/run.py", "--smoke", "--warmup", "1", "--steps", "1",
           "--variants", "dense,mod,moe,hf", "--loader-steps", "2",
           "--generation-tokens", str(GENERATION_TOKENS), "--json"]
    return json.loads(check(run(cmd, REPO, timeout=120)).stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def counted(result) -> dict:
    """Built here from the benchmark's own overrides (a world of one): the dense build's
    first loader step (the micro-batches every variant stepped) and torch's FLOP count of
    one forward over them of the dense, MoD and MoE models and of the HF peer."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from megamod.convert.hf import hf_config
    from megamod.data.tokenizer import load_tokenizer
    from megamod.models.build import build_model
    from megamod.training.loop import build_loader
    from tests.training.test_flops import CPU_ATTENTION

    def forward_flops(model, hf: bool = False) -> int:
        counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
        with counter:
            for batch in micro_batches:
                if hf:
                    model(input_ids=batch["tokens"], pixel_values=batch["images"])
                else:
                    model(batch["tokens"], batch["images"])
        return counter.get_total_flops()

    overrides = result["overrides"]
    tokenizer = load_tokenizer("tiny")
    flops = {}
    with world_of_one(overrides["dense"]) as dense:
        with build_loader(dense, tokenizer) as loader:
            micro_batches = loader.next_step()
        for name in ("dense", "mod", "moe"):
            # The MoD model computes its kept tokens padded to a multiple of 8; model FLOPs
            # count the kept tokens only (tests/training/test_flops.py does the same).
            extra = ["mod.kept_length_multiple=1"] if name == "mod" else []
            model = build_model(load_config(TINY_CONFIG, overrides[name] + extra), tokenizer)
            flops[name] = forward_flops(model.eval())
        # The HF peer as the benchmark builds it (megamod convert's config of the dense
        # model; FLOPs do not depend on the weights), eager attention as on CPU there.
        config = LlavaConfig.from_dict(
            hf_config(dense, tokenizer.image_token_id, result["vocab_size"], torch.float32))
        hf = LlavaForConditionalGeneration._from_config(config, attn_implementation="eager")
        flops["hf"] = forward_flops(hf.eval(), hf=True)
    return {"config": dense, "micro_batches": micro_batches, "flops": flops,
            "image_token_id": tokenizer.image_token_id, "pad_id": tokenizer.pad_id}


def test_json_carries_every_figure(result):
    assert set(result["variants"]) == {"dense", "mod", "moe", "hf"}
    for numbers in result["variants"].values():
        assert {"step_time_s", "tokens_per_s", "tflops_per_step", "tflops_per_s"} <= numbers.keys()
        assert numbers["step_time_s"] > 0
    assert set(result["ratios"]) == {
        "ratio_mod_vs_dense", "ratio_moe_vs_dense", "ratio_moe_vs_dense_per_flop",
        "ratio_megamod_vs_hf", "flops_ratio", "kv_cache_ratio", "ratio_loader_vs_step",
        "ratio_mod_vs_dense_prefill", "ratio_mod_vs_dense_decode",
        *(f"{key}_b{batch}" for batch in (1, 8) for key in (
            "ratio_mod_vs_dense_prefill", "ratio_mod_vs_dense_decode", "kv_cache_ratio_measured")),
    }
    loader = result["loader"]
    assert loader["decoder"] in {"DaliImageDecoder", "PythonImageDecoder"}
    assert loader["images"] > 0 and loader["images_per_s"] > 0
    assert set(result["generation"]) == {f"{n}/b{b}" for n in ("dense", "mod") for b in (1, 8)}


def test_reported_flops_are_torchs_count_of_the_benchmarked_models(result, counted):
    """Training FLOPs are 3x the forward's (megamod.training.flops' convention); the
    forward's are counted here by torch over the same micro-batches (measured: equal)."""
    image_id, patches = counted["image_token_id"], counted["config"].model.vision.num_patches
    images = [int(n) for b in counted["micro_batches"] for n in (b["tokens"] == image_id).sum(1)]
    assert [n // patches for n in images] == result["images_per_sample"]
    assert all(n % patches == 0 for n in images) and sum(images) > 0  # MoD has tokens to drop
    flops = counted["flops"]
    for name in ("dense", "mod", "moe"):
        reported = result["variants"][name]["tflops_per_step"] * 1e12
        assert reported == pytest.approx(3 * flops[name], rel=1e-12), name
    # MoD drops vision tokens, MoE runs 2 experts of the dense FFN's width per token.
    assert flops["mod"] < flops["dense"] < flops["moe"]
    assert result["ratios"]["flops_ratio"] == pytest.approx(
        flops["mod"] / flops["dense"], rel=1e-12)


def test_hf_peer_is_the_dense_model(result, counted):
    """The peer the step time is compared with does the dense model's work: torch counts
    the same FLOPs in HF's forward, and with the dense model's weights it computes the
    same loss before any step (measured: equal; float32 allows a few ulps)."""
    assert counted["flops"]["hf"] == counted["flops"]["dense"]
    assert result["variants"]["hf"]["tflops_per_step"] * 1e12 == pytest.approx(
        3 * counted["flops"]["hf"], rel=1e-12)
    losses = result["same_weights_loss"]
    assert losses["hf"] == pytest.approx(losses["megamod"], rel=1e-6)


def test_kv_cache_figures_by_hand(result, counted):
    """The smoke shape's decoder has 2 layers; PRD keeps layer 0 dense (r = 1) and makes
    layer 1 a MoD layer keeping max(r, 0.15) = 0.15 of the vision tokens (r = 0). Keys
    and values cache num_query_groups x head_dim values per token and layer."""
    config = counted["config"]
    language, patches = config.model.language, config.model.vision.num_patches
    assert language.num_layers == 2
    assert math.cos(math.pi) / 2 + 0.5 == 0.0  # PRD's r of layer 1 of 2

    def kept(tokens: int, vision: int) -> list[int]:  # per layer: dense, then MoD
        return [tokens, tokens - vision + math.trunc(vision * 0.15)]

    # The typical sample of kv_cache_ratio: one image, the full sequence.
    typical = kept(language.seq_length, patches)
    assert result["ratios"]["kv_cache_ratio"] == pytest.approx(
        sum(typical) / (2 * language.seq_length), rel=1e-12)

    # Generation caches, as allocated (fp32): each prompt (the benchmark's sample without
    # its padding, cycled over the batch) plus the GENERATION_TOKENS fed back.
    head_dim = language.hidden_size // language.num_attention_heads
    per_token = 2 * language.num_query_groups * head_dim * 4
    (sample,) = [row for b in counted["micro_batches"] for row in b["tokens"].tolist()]
    while sample[-1] == counted["pad_id"]:
        sample.pop()
    vision = sample.count(counted["image_token_id"])
    assert 0 < vision < len(sample)
    for batch in (1, 8):
        dense = result["generation"][f"dense/b{batch}"]["kv_cache_bytes"]
        mod = result["generation"][f"mod/b{batch}"]["kv_cache_bytes"]
        slots = [n + GENERATION_TOKENS for n in kept(len(sample), vision)]
        assert dense == batch * 2 * slots[0] * per_token
        assert mod == batch * sum(slots) * per_token
        assert result["ratios"][f"kv_cache_ratio_measured_b{batch}"] == pytest.approx(
            sum(slots) / (2 * slots[0]), rel=1e-12)


def test_data_mix_runs_every_sample_once_in_every_mode():
    """`--data-mix` (issue 17's benchmark) at the smoke shape: the JSON carries the ratios
    the issue asks for, and each mode steps exactly the samples drawn: the non-padding
    tokens of its micro-batches (counted from their padding masks) are the sum of the
    samples' lengths. Padded rows are all seq_length long; the short smoke samples pack
    several to a row; the official run's micro-batches hold the peer batch's samples each.
    No timing is asserted."""
    samples, peer_batch = 6, 2
    cmd = [sys.executable, "benchmarks/run.py", "--smoke", "--data-mix", "llava665k",
           "--samples", str(samples), "--peer-batch", str(peer_batch), "--json"]
    out = json.loads(check(run(cmd, REPO, timeout=120)).stdout.strip().splitlines()[-1])
    assert {"ratio_packed_vs_padded_useful_tokens", "ratio_packed_vs_hf_useful_tokens",
            "ratio_dynamic_vs_padded_useful_tokens", "ratio_dense_vs_hf_same_micro_batches",
            "ratio_mod_vs_dense_packed", "ratio_mod_vs_dense_padded"} <= out["ratios"].keys()
    assert set(out["runs"]) == {f"{model}/{mode}" for model in ("dense", "mod")
                                for mode in ("padded", "dynamic", "packed")} | {"hf/dynamic", "hf/official"}
    assert out["peer_recipe"] == {"per_device_batch": peer_batch, "ranks": 8, "group_by_modality_length": True}
    lengths, seq_length = out["sample_lengths"], out["seq_length"]
    assert len(lengths) == samples and all(0 < n <= seq_length for n in lengths)
    modes = out["modes"]
    assert set(modes) == {"padded", "dynamic", "packed", "official"}
    for mode, figures in modes.items():
        assert figures["useful_tokens"] == sum(lengths), mode
        assert figures["padding_fraction"] == pytest.approx(
            1 - sum(lengths) / figures["positions"]), mode
    assert modes["padded"]["positions"] == samples * seq_length
    assert modes["dynamic"]["positions"] < modes["padded"]["positions"]
    assert modes["packed"]["rows"] < samples
    assert modes["official"]["rows"] == samples and modes["official"]["steps"] == samples // peer_batch


# The official sampler, run unmodified under its pinned transformers (whose Trainer
# module it imports; only tokenizing's optional packages are left visible to it, as
# tests/data/llava_reference.py does).
OFFICIAL_SAMPLER = """
import json, sys
import torch
import transformers.utils.import_utils as flags
needed = {"_torch_available", "_tokenizers_available", "_sentencepiece_available",
          "_protobuf_available", "_safetensors_available"}
for name, value in vars(flags).copy().items():
    if name.endswith("_available") and isinstance(value, bool) and name not in needed:
        setattr(flags, name, False)
from llava.train.llava_trainer import get_modality_length_grouped_indices
out = []
for case in json.load(sys.stdin):
    torch.manual_seed(case["seed"])
    generator = torch.Generator().manual_seed(case["seed"])
    out.append(get_modality_length_grouped_indices(case["lengths"], case["batch_size"],
                                                   case["world_size"], generator))
print(json.dumps(out))
"""


def test_peer_sampler_orders_samples_as_llavas(official_llava):
    """benchmarks/packing.py's transliteration of LLaVA's `group_by_modality_length` sampler
    gives the official function's order, index for index, under the same seeds: both
    modalities with remainders, exact megabatches, one modality, and chunks that do not
    divide (split_to_even_chunks' round-robin branch)."""
    import subprocess

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import packing
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    rng = torch.Generator().manual_seed(0)

    def lengths(count: int, text_only_share: float) -> list[int]:
        values = torch.randint(1, 400, (count,), generator=rng).tolist()
        text = (torch.rand(count, generator=rng) < text_only_share).tolist()
        return [-n if t else n for n, t in zip(values, text)]

    cases = [
        {"lengths": lengths(300, 0.1), "batch_size": 4, "world_size": 8, "seed": 1},
        {"lengths": lengths(256, 0.0), "batch_size": 16, "world_size": 8, "seed": 2},
        {"lengths": [-n for n in lengths(70, 0.0)], "batch_size": 4, "world_size": 2, "seed": 3},
        {"lengths": lengths(90, 0.3), "batch_size": 3, "world_size": 5, "seed": 4},
        {"lengths": lengths(50, 0.5), "batch_size": 7, "world_size": 3, "seed": 5},  # 21 a megabatch
    ]
    env = {**__import__("os").environ, "PYTHONPATH": str(official_llava)}
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", OFFICIAL_SAMPLER],
                            input=json.dumps(cases), capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    official = json.loads(result.stdout)
    for case, expected in zip(cases, official, strict=True):
        torch.manual_seed(case["seed"])
        generator = torch.Generator().manual_seed(case["seed"])
        ours = packing.modality_length_grouped_indices(case["lengths"], case["batch_size"],
                                                       case["world_size"], generator)
        assert ours == expected
        assert sorted(ours) == list(range(len(case["lengths"])))


def test_packed_attention_benchmark_times_each_path():
    """benchmarks/packed_attention.py on a small case: every path runs forward and backward
    and is reported (the times themselves are not asserted)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import packed_attention
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    figures = packed_attention.measure(48, [[20, 12], [48]], repeats=2)
    assert set(figures) == {"packed_s", "mask_s", "plain_causal_s", "ratio_mask_vs_packed"}
    assert all(value > 0 for value in figures.values())
