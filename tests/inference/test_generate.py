"""Generation with the KV cache against independent references (a world of one, fp32).

- Cached decoding of a batch (left-padded prompts with 0, 1 and 2 images), and of each
  prompt alone, equals the reference that recomputes each sample's whole sequence with
  the training forward at every step: dense, p-MoD (PRD, random routers), p-MoD + MoE.
- p-MoD with ratio 1 on every layer and zero routers generates the dense model's tokens.
- The cache as allocated holds exactly what `training/flops.kv_cache_bytes` counts.
- `megamod generate` on a trained checkpoint: text out, bad input exits 2 (more of its
  input checks: tests/inference/test_generate_inputs.py).

Weights are drawn with a large spread so that the tiny model's greedy tokens differ from
step to step (checked): equal token lists then mean equal argmaxes all along.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from megamod.config import load_config
from megamod.data.tokenizer import load_tokenizer
from tests.launcher import TINY_CONFIG, free_port, megamod_commands, megamod_train, run, world_of_one

QUIET = ["checkpoint.save_dir=null", "checkpoint.save_interval=null", "logging.tensorboard_dir=null"]
PRD = ["mod.enabled=true"]  # the default schedule: 3 of the 4 tiny layers are MoD layers
MOE = ["moe.num_experts=4", "moe.router_topk=2", "moe.layer_freq=2"]
ALL_LAYERS_RATIO_ONE = ["mod.enabled=true", "mod.schedule=fixed", "mod.ratio=1.0", "mod.layers=[0,1,2,3]"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def world():
    with world_of_one(QUIET):
        yield


def generator_for(overrides: list[str], state_dict: dict | None = None):
    """A Generator on the tiny model; random weights (std 0.1) unless `state_dict`."""
    from megamod.inference.generate import Generator
    from megamod.models.build import build_model

    config = load_config(TINY_CONFIG, QUIET + overrides)
    tokenizer = load_tokenizer("tiny")
    model = build_model(config, tokenizer)
    if state_dict is None:
        draw = torch.Generator().manual_seed(0)
        for name, param in model.named_parameters():
            if param.dim() >= 2 or ".mod_router." in name:
                param.data.normal_(0.0, 0.1, generator=draw)
    else:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        assert not unexpected and all(".mod_router." in k for k in missing)
    return Generator(model, tokenizer, config)


def batch(generator) -> tuple[list[list[int]], torch.Tensor]:
    """Three prompts of different lengths: one image, two images, text only."""
    image = generator.tokenizer.image_token_id
    patches = generator.config.model.vision.num_patches
    bos = generator.tokenizer.bos_id
    prompts = [
        [bos, 40, 41] + [image] * patches + [42, 43, 44, 45],
        [bos] + [image] * patches + [46] + [image] * patches + [47, 48],
        [bos, 49, 50, 51],
    ]
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return prompts, images


@pytest.mark.parametrize("overrides", [[], PRD, PRD + MOE], ids=["dense", "mod", "mod_moe"])
def test_cached_generation_equals_recomputing_the_prefix(world, overrides):
    generator = generator_for(overrides)
    prompts, images = batch(generator)
    cached = generator.generate(prompts, images, NEW_TOKENS)
    reference = generator.generate(prompts, images, NEW_TOKENS, use_cache=False)
    assert cached.tokens == reference.tokens
    assert all(len(set(row)) >= 4 for row in cached.tokens), cached.tokens  # not one token over and over
    # Alone, a prompt has no padding: the cache passes no masks (the attention's causal
    # fast path at prefill), with the same result.
    for prompt, own, expected in zip(prompts, generator.images_per_prompt(prompts, images),
                                     reference.tokens):
        assert generator.generate([prompt], own, NEW_TOKENS).tokens == [expected]
    mod_layers = len(generator.model.mod_layers())
    assert mod_layers == (3 if overrides else 0)
    if mod_layers:  # the MoD layers did cache less
        assert cached.cache_bytes < cached.dense_cache_bytes
    else:
        assert cached.cache_bytes == cached.dense_cache_bytes


def test_ratio_one_generates_the_dense_models_tokens(world):
    dense = generator_for([])
    mod = generator_for(ALL_LAYERS_RATIO_ONE, dense.model.state_dict())
    assert len(mod.model.mod_layers()) == 4
    prompts, images = batch(dense)
    expected = dense.generate(prompts, images, NEW_TOKENS)
    got = mod.generate(prompts, images, NEW_TOKENS)
    assert got.tokens == expected.tokens
    # Per sample, each layer caches the sample's own tokens: with batch padding left out,
    # no more than the dense layers' slots.
    assert got.cache_bytes <= expected.cache_bytes


def test_cache_bytes_equal_the_accounting(world):
    from megamod.training.flops import Sample, kv_cache_bytes

    for overrides in ([], PRD, PRD + MOE):
        generator = generator_for(overrides)
        prompts, images = batch(generator)
        for prompt, own in zip(prompts, generator.images_per_prompt(prompts, images)):
            result = generator.generate([prompt], own, NEW_TOKENS)
            # Cached: the prompt and every new token but the last (never fed back).
            sample = Sample(images=len(own), seq_length=len(prompt) + NEW_TOKENS - 1)
            assert result.cache_bytes == kv_cache_bytes(generator.config, sample, bytes_per_value=4), (overrides, len(own))


def test_bf16_generation_caches_bf16(world):
    """A bf16 run's model generates in bf16 (as Float16Module trained it); the cache holds
    2-byte values, as the accounting's default counts them. The tokens themselves are
    compared in fp32 above: bf16 rounding may flip a near tie of the tiny model."""
    from megamod.training.flops import Sample, kv_cache_bytes

    generator = generator_for(PRD + MOE + ["precision.params_dtype=bf16"])
    assert {p.dtype for p in generator.model.parameters()} == {torch.bfloat16}
    prompts, images = batch(generator)
    result = generator.generate(prompts[:1], images[:1], NEW_TOKENS)
    assert len(result.tokens[0]) >= 1
    sample = Sample(images=1, seq_length=len(prompts[0]) + NEW_TOKENS - 1)
    assert result.cache_bytes == kv_cache_bytes(generator.config, sample)


def test_sampling_follows_its_seed(world):
    generator = generator_for(PRD)
    prompts, images = batch(generator)
    first = generator.generate(prompts, images, NEW_TOKENS, temperature=1.0, seed=3)
    again = generator.generate(prompts, images, NEW_TOKENS, temperature=1.0, seed=3)
    other = generator.generate(prompts, images, NEW_TOKENS, temperature=1.0, seed=4)
    assert first.tokens == again.tokens != other.tokens
    vocab = generator.tokenizer.vocab_size
    assert all(0 <= t < vocab for row in first.tokens + other.tokens for t in row)


# ------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A p-MoD + MoE checkpoint of 2 tiny steps, and an image file."""
    import numpy as np
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("generate")
    megamod_train(1, PRD + MOE + ["train.train_iters=2", "checkpoint.save_interval=null",
                                  "logging.tensorboard_dir=null", f"checkpoint.save_dir={root}/ckpt"],
                  cwd=root)
    Image.fromarray(np.asarray(skimage.data.astronaut())).save(root / "astronaut.png")
    return root


def generate(*args: object, cwd: Path):
    return run([sys.executable, "-m", "megamod", "generate", *map(str, args)], cwd=cwd,
               extra_env={"MASTER_PORT": str(free_port())})


def test_generate_command(trained):
    result = generate("--checkpoint", "ckpt", "--image", "astronaut.png", "--prompt",
                      "What is in the picture?", "--max-new-tokens", 5, "--json", cwd=trained)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.splitlines()[-1])
    assert 1 <= len(answer["tokens"]) <= 5 and isinstance(answer["text"], str)
    # vicuna_v1 prompt: system text, USER: <16 image tokens> question ASSISTANT:
    assert answer["prompt_tokens"] > 16
    assert 0 < answer["kv_cache_bytes"] < answer["kv_cache_bytes_dense"]

    # The rest is about what the command prints and its exit code: all in one process
    # (the process boundary is the first command's).
    bad = [
        (["--checkpoint", "ckpt", "--image", "missing.png", "--prompt", "x"], "missing.png"),
        (["--checkpoint", "ckpt", "--image", "ckpt/latest_checkpointed_iteration.txt", "--prompt", "x"],
         "not a readable image"),
        (["--checkpoint", "ckpt", "--image", "astronaut.png", "--prompt", "<image> and <image>?"], "--image"),
        (["--checkpoint", "ckpt", "--image", "astronaut.png", "--prompt", "x", "--max-new-tokens", "0"],
         "--max-new-tokens"),
        # Would size a KV cache of 10^9 tokens (tens of GB): refused, naming the most that fits.
        (["--checkpoint", "ckpt", "--image", "astronaut.png", "--prompt", "x", "--max-new-tokens", "1000000000"],
         ("seq_length=128 (the longest sequence it was trained on, which also bounds the KV cache): "
          "give --max-new-tokens")),
        (["--checkpoint", "nowhere", "--prompt", "x"], "nowhere"),
    ]
    plain, *refused = megamod_commands(
        [["generate", "--checkpoint", "ckpt", "--image", "astronaut.png", "--prompt", "Describe it.",
          "--max-new-tokens", 3]] + [["generate", *args] for args, _ in bad], cwd=trained)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "KV cache" in plain.stderr and "prompt" in plain.stderr
    for (args, word), result in zip(bad, refused):
        assert result.returncode == 2 and word in result.stderr, (args, result.stderr[-2000:])


def test_a_save_dir_carries_its_hugging_face_tokenizer(tmp_path):
    """Training copies a Hugging Face tokenizer beside its checkpoints; generation reads the
    copy, so the save_dir alone is enough even once the original folder is gone."""
    from megamod.training.checkpoint import keep_tokenizer, tokenizer_of

    original = tmp_path / "vicuna-like"
    load_tokenizer("tiny").hf.save_pretrained(str(original))
    config = load_config(TINY_CONFIG, [f"data.tokenizer={original}"])
    save_dir = tmp_path / "ckpt"
    save_dir.mkdir()
    keep_tokenizer(save_dir, "tiny")  # bundled: nothing to copy
    assert not (save_dir / "tokenizer").exists() and tokenizer_of(save_dir, config) == str(original)
    keep_tokenizer(save_dir, str(original))
    for path in original.iterdir():
        path.unlink()
    original.rmdir()
    copy = tokenizer_of(save_dir, config)
    assert copy == str(save_dir / "tokenizer")
    text = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    assert load_tokenizer(copy).encode(text) == load_tokenizer("tiny").encode(text)
    assert load_tokenizer(copy).image_token_id == load_tokenizer("tiny").image_token_id


def test_a_vicuna_style_tokenizer_trains_in_bf16_at_tp2_and_generates(llama_sp_tokenizer, tmp_path):
    """The real kind of tokenizer end to end: a SentencePiece tokenizer.model folder (no
    tokenizer.json) trains in bf16 at TP=2 (its 32,000-like vocabulary + <image>, padded for
    TP), the save_dir keeps a copy, and generation from the save_dir alone prompts with the
    ids the template gives and answers in that tokenizer's vocabulary."""
    import shutil

    import numpy as np
    import skimage.data
    from PIL import Image

    from megamod.data.conversation import encode_prompt

    folder = tmp_path / "vicuna-like"
    shutil.copytree(llama_sp_tokenizer, folder)
    megamod_train(2, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                      "precision.params_dtype=bf16", f"data.tokenizer={folder}",
                      "train.train_iters=2", "checkpoint.save_interval=null",
                      "logging.tensorboard_dir=null", f"checkpoint.save_dir={tmp_path}/ckpt"],
                  cwd=tmp_path)
    tokenizer = load_tokenizer(str(folder))
    shutil.rmtree(folder)  # generation must need nothing but the save_dir
    Image.fromarray(np.asarray(skimage.data.chelsea())).save(tmp_path / "cat.png")
    result = generate("--checkpoint", "ckpt", "--image", "cat.png", "--prompt", "What animal is this?",
                      "--max-new-tokens", 4, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.splitlines()[-1])
    config = load_config(TINY_CONFIG)
    prompt = encode_prompt([{"from": "human", "value": "<image>\nWhat animal is this?"}], "vicuna_v1",
                           tokenizer, config.model.vision.num_patches)
    assert answer["prompt_tokens"] == len(prompt)
    assert all(0 <= t < tokenizer.vocab_size for t in answer["tokens"])
    assert answer["text"] == tokenizer.decode(
        [t for t in answer["tokens"] if t != tokenizer.eos_id], skip_special_tokens=True)
