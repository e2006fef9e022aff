"""The analytic FLOPs against torch's own count of the matrix multiplications a forward
pass runs (torch.utils.flop_counter), for dense, MoE, MoD and MoD + MoE tiny models, and
the KV-cache bytes of MoD against the dense model's by hand."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from megamod.config import load_config
from megamod.data.tokenizer import load_tokenizer
from megamod.training.flops import Sample, kv_cache_bytes, sample_flops
from tests.launcher import TINY_CONFIG, world_of_one

# torch counts its GPU attention kernels with `sdpa_flop_count` (the full square of the
# tokens, causal or not) but has no formula for the CPU flash kernel that megamod's
# attention runs here: the same formula, given for it.
CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value),
}
QUIET = ["checkpoint.save_dir=null", "checkpoint.save_interval=null", "logging.tensorboard_dir=null"]
MOE = ["moe.num_experts=4", "moe.layer_freq=2"]
MOD = ["mod.enabled=true", "mod.kept_length_multiple=1"]  # no padding slots to compute


@pytest.fixture(scope="module")
def world():
    with world_of_one(QUIET):
        yield


@pytest.fixture(scope="module")
def samples(world):
    """Single samples with 0, 1 and 2 images."""
    from megamod.training.loop import build_loader

    config = load_config(TINY_CONFIG, QUIET + ["train.micro_batch_size=1", "train.global_batch_size=1",
                                               "data.padding=max_length"])
    image_id = load_tokenizer("tiny").image_token_id
    found = {}
    with build_loader(config, load_tokenizer("tiny")) as loader:
        while len(found) < 3:
            (batch,) = loader.next_step()
            images = int((batch["tokens"] == image_id).sum()) // 16
            found.setdefault(images, batch)
    return found


@pytest.mark.parametrize("overrides", [[], MOE, MOD, MOD + MOE], ids=["dense", "moe", "mod", "mod_moe"])
def test_forward_flops_equal_torch_count(samples, overrides):
    from megamod.models.build import build_model

    config = load_config(TINY_CONFIG, QUIET + overrides)
    model = build_model(config, load_tokenizer("tiny")).eval()
    vocab = model.language_model.vocab_size
    for images, batch in samples.items():
        counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
        with counter:  # (under no_grad its module tracker fails; nothing calls backward)
            model(batch["tokens"], batch["images"])
        expected = sample_flops(config, Sample(images, config.model.language.seq_length), vocab,
                                training=False)
        assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9), images


def test_mod_kv_cache_counts_kept_tokens_only():
    dense = load_config(TINY_CONFIG)
    mod = load_config(TINY_CONFIG, ["mod.enabled=true"])  # PRD on 4 layers: -, 0.75, 0.25, 0.15
    sample = Sample(images=2, seq_length=100)  # 32 vision tokens
    per_token = 2 * 2 * 32 * 2  # K and V, 2 query groups of 32 dims, bf16
    assert kv_cache_bytes(dense, sample) == 4 * 100 * per_token
    kept = [100, 100 - 32 + 24, 100 - 32 + 8, 100 - 32 + 4]
    assert kv_cache_bytes(mod, sample) == sum(kept) * per_token


def test_step_flops_add_up_each_samples_training_flops(samples):
    from megamod.training.flops import StepFlops

    config = load_config(TINY_CONFIG, MOD + MOE)
    image_id, vocab = load_tokenizer("tiny").image_token_id, 1024
    step = StepFlops(config, vocab, image_id)
    expected = sum(sample_flops(config, Sample(images, 128), vocab) for images in samples)
    assert len(samples) == 3 and step(list(samples.values())) == pytest.approx(expected, rel=1e-12)
