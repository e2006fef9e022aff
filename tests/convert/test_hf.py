"""`megamod convert` against transformers' own models: tiny random LLaVA, CLIP and Llama
models built here (no downloads), converted through the CLI's `main` in this process.

- HF -> megamod (`--tp 2`, the odd vocabulary padded): megamod's forward gives HF's logits
  (eager attention, fp32) at TP=1 in this process and at TP=2 (one 2-process launch).
- HF -> megamod -> HF: every tensor megamod keeps comes back bit-identical, the ViT layer
  after the feature layer is gone, and transformers loads the result to the same logits.
- hf-parts (a CLIPModel + a LlamaForCausalLM): the ViT gives CLIP's hidden states at the
  feature layer, the LM Llama's logits, the projector is fresh, and `megamod train` runs
  from the output's model.yaml, training the projector.
- MoE: export writes per-expert tensors on the MoE layers only; import gives back every
  tensor.
- Bad input exits 2 naming the file or option and writes nothing.
Expected names and layouts are written out here, not taken from the code under test.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from megamod.data.tokenizer import load_tokenizer
from megamod.errors import CheckpointError
from tests.launcher import REPO, check, free_port, launch, run, world_of_one

VOCAB = load_tokenizer("tiny").vocab_size  # odd (887), so TP=2 needs padding
IMAGE = 3  # its <image> id
QUIET = ["checkpoint.save_dir=null", "checkpoint.save_interval=null",
         "logging.tensorboard_dir=null"]


def vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=64, intermediate_size=256, image_size=64, patch_size=16,
                            num_hidden_layers=3, num_attention_heads=4)


def text_config() -> LlamaConfig:
    return LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                       max_position_embeddings=128, rope_theta=20000.0, rms_norm_eps=1e-5)


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """HF initialises biases to 0 and norms to 1: make every tensor count."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.1 + ("norm" in name))
    return model


def save_with_tokenizer(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    load_tokenizer("tiny").hf.save_pretrained(folder)
    return folder


def convert(*args: object) -> int:
    from megamod.cli.convert import main

    return main([str(a) for a in args])


def hf_llava(folder: Path) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors (megatron-core's `_extra_state` entries left out), copied."""
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def load(ckpt: Path):
    """The converted checkpoint as `megamod train` builds and loads it (TP=1)."""
    from megamod.training.checkpoint import load_model_weights, saved_config
    from megamod.models.build import build_model

    config = saved_config(ckpt)
    model = build_model(config, load_tokenizer(config.data.tokenizer))
    load_model_weights(ckpt, model)
    return model.eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    config = LlavaConfig(vision_config=vision_config(), text_config=text_config(),
                         image_token_index=IMAGE)
    model = randomised(LlavaForConditionalGeneration(config))
    return save_with_tokenizer(model, tmp_path_factory.mktemp("hf") / "llava")


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(10, VOCAB, (2, 40), generator=generator)
    ids[:, 2:18] = IMAGE  # one placeholder per patch: 16 per image, expanded as both expect
    return {"ids": ids, "pixels": torch.randn(2, 3, 64, 64, generator=generator)}


@pytest.fixture(scope="module")
def hf_logits(hf_dir, inputs) -> torch.Tensor:
    with torch.no_grad():
        return hf_llava(hf_dir)(input_ids=inputs["ids"], pixel_values=inputs["pixels"]).logits


# ------------------------------------------------------- pure adapters and bad input


def hf_state(hf_dir: Path) -> tuple[dict, dict]:
    return load_file(hf_dir / "model.safetensors"), AutoConfig.from_pretrained(hf_dir).to_dict()


def test_fused_tensors_follow_megatron_layouts(hf_dir):
    from megamod.convert.hf import from_hf

    hf, hf_config = hf_state(hf_dir)
    ours, raw = from_hf(hf, hf_config)
    # Decoder: 4 heads in 2 query groups of 32-dim heads: [q0 q1 k0 v0 q2 q3 k1 v1].
    t = "language_model.model.layers.1.self_attn."
    q, k, v = (hf[f"{t}{x}_proj.weight"] for x in "qkv")
    expected = torch.cat([q[:64], k[:32], v[:32], q[64:], k[32:], v[32:]])
    qkv = ours["language_model.decoder.layers.1.self_attention.linear_qkv.weight"]
    assert torch.equal(qkv, expected)
    # ViT: one head per group, biases too.
    a = "vision_tower.encoder.layers.0.self_attn."
    q, k, v = (hf[f"{a}{x}_proj.bias"] for x in "qkv")
    expected = torch.cat([torch.cat([x[i:i + 16] for x in (q, k, v)]) for i in range(0, 64, 16)])
    qkv = ours["vision_model.decoder.layers.0.self_attention.linear_qkv.bias"]
    assert torch.equal(qkv, expected)
    m = "language_model.model.layers.0.mlp."
    assert torch.equal(ours["language_model.decoder.layers.0.mlp.linear_fc1.weight"],
                       torch.cat([hf[m + "gate_proj.weight"], hf[m + "up_proj.weight"]]))
    assert ours["vision_model.class_token"].shape == (1, 1, 64)
    # The names a loaded model holds in memory (`model.` in front) convert the same.
    in_memory, _ = from_hf(hf_llava(hf_dir).state_dict(), hf_config)
    assert in_memory.keys() == ours.keys()
    assert all(torch.equal(in_memory[k], v) for k, v in ours.items())
    assert not any(k.startswith("vision_model.decoder.layers.2.") for k in ours)  # not built
    assert raw["model"]["vision"]["feature_layer"] == -2
    language = raw["model"]["language"]
    assert language["num_query_groups"] == 2 and language["rotary_base"] == 20000
    assert language["vocab_size"] == VOCAB


def edited(config: dict, path: str, value: object) -> dict:
    config = copy.deepcopy(config)
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value
    return config


@pytest.mark.parametrize("path, value, named", [
    ("text_config.model_type", "qwen2", "text_config.model_type"),
    ("text_config.rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0},
     "text_config.rope_parameters"),
    ("text_config.attention_bias", True, "text_config.attention_bias"),
    ("text_config.sliding_window", 4096, "text_config.sliding_window"),
    ("projector_hidden_act", "gelu_pytorch_tanh", "projector_hidden_act"),
    ("vision_feature_select_strategy", "full", "vision_feature_select_strategy"),
    ("vision_feature_layer", [-2, -1], "vision_feature_layer"),
    ("vision_feature_layer", 0, "vision_feature_layer"),
    ("vision_config.model_type", "siglip_vision_model", "vision_config.model_type"),
])
def test_what_megamod_cannot_represent_is_refused_by_name(hf_dir, path, value, named):
    from megamod.convert.hf import from_hf

    hf, hf_config = hf_state(hf_dir)
    with pytest.raises(CheckpointError, match=re.escape(named)):
        from_hf(hf, edited(hf_config, path, value))


def test_unknown_tensors_and_positive_feature_layers(hf_dir):
    from megamod.config import Config, build_dataclass
    from megamod.convert.hf import from_hf, to_hf

    hf, hf_config = hf_state(hf_dir)
    bias = {"language_model.model.layers.0.self_attn.q_proj.bias": torch.zeros(128)}
    with pytest.raises(CheckpointError, match="q_proj.bias"):  # attention bias, config silent
        from_hf({**hf, **bias}, hf_config)
    ours, raw = from_hf(hf, hf_config)
    router = {"language_model.decoder.layers.1.mod_router.weight": torch.zeros(1, 128)}
    with pytest.raises(CheckpointError, match="mod_router"):  # never dropped silently
        to_hf({**ours, **router}, build_dataclass(Config, raw, prefix=""), IMAGE)
    # hidden_states[2] of 3 layers is hidden_states[-2].
    _, raw = from_hf(hf, edited(hf_config, "vision_feature_layer", 2))
    assert raw["model"]["vision"]["feature_layer"] == -2


def test_bad_input_exits_2_naming_it_and_writes_nothing(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "llava-1.5-7b-hf"
    assert convert("--from", "hf", "--to", "megamod", "--input", missing, "--output", out) == 2
    assert str(missing) in capsys.readouterr().err
    scaled = shutil.copytree(hf_dir, tmp_path / "scaled")
    config = json.loads((scaled / "config.json").read_text())
    config["text_config"]["rope_parameters"] = {"rope_type": "linear", "factor": 2.0,
                                                "rope_theta": 1e4}
    (scaled / "config.json").write_text(json.dumps(config))
    assert convert("--from", "hf", "--input", scaled, "--output", out) == 2
    err = capsys.readouterr().err
    assert str(scaled) in err and "text_config.rope_parameters" in err and "linear" in err, err
    assert sorted(tmp_path.iterdir()) == [missing.parent / "scaled"]  # no output, no staging
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert convert("--from", "hf", "--input", hf_dir, "--output", out) == 2
    assert "--force" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep"


# ------------------------------------------------------- conversions (before any world)


@pytest.fixture(scope="module")
def padded(hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("padded") / "ckpt"
    assert convert("--from", "hf", "--to", "megamod", "--input", hf_dir, "--output", out,
                   "--tp", 2) == 0
    return out


@pytest.fixture(scope="module")
def round_trip(hf_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("round_trip")
    (root / "ckpt").mkdir()
    (root / "ckpt" / "stale.txt").write_text("an earlier output")
    assert convert("--from", "hf", "--to", "megamod", "--input", hf_dir, "--output", root / "ckpt",
                   "--force") == 0
    assert not (root / "ckpt" / "stale.txt").exists()
    assert convert("--from", "megamod", "--to", "hf", "--input", root / "ckpt",
                   "--output", root / "hf") == 0
    return root


@pytest.fixture(scope="module")
def tied_bf16(tmp_path_factory) -> Path:
    """A bf16 LLaVA with tied embeddings, imported and exported."""
    root = tmp_path_factory.mktemp("tied_bf16")
    text = text_config()
    text.tie_word_embeddings = True
    config = LlavaConfig(vision_config=vision_config(), text_config=text, image_token_index=IMAGE,
                         tie_word_embeddings=True)
    model = randomised(LlavaForConditionalGeneration(config)).to(torch.bfloat16)
    save_with_tokenizer(model, root / "hf")
    assert convert("--from", "hf", "--input", root / "hf", "--output", root / "ckpt") == 0
    assert convert("--from", "megamod", "--input", root / "ckpt", "--output", root / "back") == 0
    return root


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A MoE model's checkpoint (experts on layers 0 and 2 of 4), exported and imported back."""
    from megamod.training.checkpoint import save_checkpoint
    from megamod.models.build import build_model

    root = tmp_path_factory.mktemp("moe")
    with world_of_one(QUIET + ["moe.num_experts=4", "moe.layer_freq=2"]) as config:
        model = build_model(config, load_tokenizer("tiny"))
        save_checkpoint(root / "ckpt", 0, model, None, None, {}, config)
        original = tensors(model)
    assert convert("--from", "megamod", "--to", "hf", "--input", root / "ckpt",
                   "--output", root / "hf") == 0
    assert convert("--from", "hf", "--to", "megamod", "--input", root / "hf",
                   "--output", root / "back") == 0
    return root, original


def as_pytorch_shards(folder: Path) -> None:
    """lmsys/vicuna-7b-v1.5's layout: PyTorch .bin shards and their index, RoPE buffers kept."""
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)
    names = sorted(state)
    shards = {f"pytorch_model-0000{i + 1}-of-00002.bin": names[i::2] for i in range(2)}
    for file, keys in shards.items():
        torch.save({key: state[key] for key in keys}, folder / file)
    weight_map = {key: file for file, keys in shards.items() for key in keys}
    size = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    """openai/clip-vit-large-patch14-336's layout (a whole CLIPModel) + a Llama causal LM
    in Vicuna's."""
    root = tmp_path_factory.mktemp("parts")
    clip_text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2)
    clip = CLIPConfig(vision_config=vision_config().to_dict(), text_config=clip_text,
                      projection_dim=16)
    randomised(CLIPModel(clip)).save_pretrained(root / "clip")
    save_with_tokenizer(randomised(LlamaForCausalLM(text_config())), root / "llama")
    as_pytorch_shards(root / "llama")
    assert convert("--from", "hf-parts", "--vision", root / "clip", "--language", root / "llama",
                   "--output", root / "ckpt") == 0
    return root


@pytest.fixture(scope="module")
def world(padded, round_trip, tied_bf16, moe, parts):
    """This process as a one-rank job, once every conversion (each its own) is done."""
    with world_of_one(QUIET):
        yield


# ------------------------------------------------------- HF -> megamod


def test_logits_match_hf_at_tp1(world, padded, inputs, hf_logits):
    model = load(padded)
    with torch.no_grad():
        logits = model(inputs["ids"], inputs["pixels"])
    assert logits.shape[-1] == 1024  # 887 padded to a multiple of 128 x TP 2
    torch.testing.assert_close(logits[..., :VOCAB], hf_logits, atol=1e-4, rtol=0)
    assert torch.equal(logits[..., VOCAB:], torch.zeros_like(logits[..., VOCAB:]))


def test_logits_match_hf_at_tp2(padded, inputs, hf_logits, tmp_path):
    torch.save(inputs, tmp_path / "inputs.pt")
    worker = REPO / "tests" / "convert" / "tp_worker.py"
    launch(2, [str(worker), str(padded), str(tmp_path / "inputs.pt"),
                 str(tmp_path / "logits.pt")], cwd=tmp_path)
    logits = torch.load(tmp_path / "logits.pt")
    assert logits.shape[-1] == 1024  # two gathered vocabulary shards
    torch.testing.assert_close(logits[..., :VOCAB], hf_logits, atol=1e-4, rtol=0)


def test_model_yaml_describes_the_checkpoint(padded):
    from megamod.config import load_config

    config = load_config(padded / "model.yaml")
    assert config.checkpoint.load == str(padded) and config.checkpoint.finetune
    assert load_tokenizer(config.data.tokenizer).image_token_id == IMAGE
    assert (config.model.language.vocab_size, config.model.vision.feature_layer) == (1024, -2)


# ------------------------------------------------------- HF -> megamod -> HF


def test_round_trip_is_bit_identical(round_trip, hf_dir, inputs, hf_logits):
    back = load_file(round_trip / "hf" / "model.safetensors")
    # transformers 5 writes the tower without `vision_model.`; the export writes the hub's
    # llava-1.5 layout, which transformers 4 and 5 both read.
    expected = {re.sub(r"^vision_tower\.", "vision_tower.vision_model.", k): v
                for k, v in load_file(hf_dir / "model.safetensors").items()}
    unbuilt = {k for k in expected if ".encoder.layers.2." in k}  # after feature layer -2 of 3
    assert unbuilt and back.keys() == expected.keys() - unbuilt
    for key, tensor in back.items():
        if ".post_layernorm." in key:  # not in megamod's model: written as identity
            identity = torch.ones(64) if key.endswith("weight") else torch.zeros(64)
            assert torch.equal(tensor, identity)
        else:
            assert torch.equal(tensor, expected[key]), key
    ours, theirs = (AutoConfig.from_pretrained(d).to_dict() for d in (round_trip / "hf", hf_dir))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "rope_parameters", "tie_word_embeddings", "max_position_embeddings"):
        assert ours["text_config"][key] == theirs["text_config"][key], key
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "image_size",
                "patch_size", "hidden_act", "layer_norm_eps"):
        assert ours["vision_config"][key] == theirs["vision_config"][key], key
    assert (ours["vision_config"]["num_hidden_layers"], ours["vision_feature_layer"]) == (2, -1)
    assert ours["image_token_index"] == IMAGE and ours["dtype"] == "float32"
    assert load_tokenizer(str(round_trip / "hf")).image_token_id == IMAGE
    with torch.no_grad():
        exported = hf_llava(round_trip / "hf")
        logits = exported(input_ids=inputs["ids"], pixel_values=inputs["pixels"]).logits
    torch.testing.assert_close(logits, hf_logits, atol=1e-6, rtol=0)


def test_tied_bf16_round_trip_keeps_dtype_and_ties(tied_bf16):
    from megamod.training.checkpoint import saved_config

    config = saved_config(tied_bf16 / "ckpt")
    assert config.precision.params_dtype == "bf16"
    assert not config.model.language.untie_embeddings_and_output_weights
    original = load_file(tied_bf16 / "hf" / "model.safetensors")
    back = load_file(tied_bf16 / "back" / "model.safetensors")
    assert not any("lm_head" in k for k in back)
    for key, tensor in back.items():
        assert tensor.dtype == torch.bfloat16, key
        if ".post_layernorm." not in key:
            assert torch.equal(tensor, original[key.replace(".vision_model.", ".")]), key
    config = json.loads((tied_bf16 / "back" / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["dtype"] == "bfloat16"


# ------------------------------------------------------- hf-parts


def test_parts_give_clip_features_and_llama_logits(world, parts, inputs):
    model = load(parts / "ckpt")
    clip = CLIPVisionModel.from_pretrained(parts / "clip", attn_implementation="eager").eval()
    llama = LlamaForCausalLM.from_pretrained(parts / "llama", attn_implementation="eager").eval()
    text = inputs["ids"].masked_fill(inputs["ids"] == IMAGE, 5)
    with torch.no_grad():
        features = model.vision_model(inputs["pixels"])
        reference = clip(pixel_values=inputs["pixels"], output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(features, reference, atol=1e-5, rtol=0)
        logits = model(text, torch.empty(0, 3, 64, 64))
        torch.testing.assert_close(logits, llama(input_ids=text).logits, atol=1e-4, rtol=0)
    projector = model.vision_projection.encoder  # fresh: megatron-core's init (std 0.02)
    assert 0.015 < projector.linear_fc1.weight.std().item() < 0.025
    assert not projector.linear_fc1.bias.any()


def test_parts_train_the_projector_from_model_yaml(parts):
    model_yaml = str(parts / "ckpt" / "model.yaml")
    result = check(run([sys.executable, "-m", "megamod", "train", model_yaml,
                        "train.trainable=[projector]", "train.train_iters=2",
                        "train.global_batch_size=2", "train.lr_warmup_fraction=0"], cwd=parts,
                       extra_env={"MASTER_PORT": str(free_port())}))  # not this process's
    assert f"loaded model weights from {parts / 'ckpt'}" in result.stdout + result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    projector = 64 * 128 + 128 + 128 * 128 + 128
    assert records[0]["trainable_parameters_per_rank"] == projector
    assert [r["iteration"] for r in records if "train/loss" in r] == [1, 2], result.stdout


# ------------------------------------------------------- MoE


def test_moe_exports_per_expert_tensors_and_imports_back(world, moe):
    from megamod.training.checkpoint import saved_config

    root, original = moe
    hf = load_file(root / "hf" / "model.safetensors")
    text = json.loads((root / "hf" / "config.json").read_text())["text_config"]
    assert text["num_local_experts"] == 4 and text["num_experts_per_tok"] == 2
    assert text["moe_layers"] == [0, 2]
    for i in range(4):
        mlp = f"language_model.model.layers.{i}.mlp."
        expected = {f"{mlp}{p}_proj.weight" for p in ("gate", "up", "down")}
        if i in (0, 2):
            expected = {f"{mlp}gate.weight"} | {f"{mlp}experts.{e}.{p}_proj.weight"
                                                for e in range(4) for p in ("gate", "up", "down")}
        assert {k for k in hf if k.startswith(mlp)} == expected, i
    fc1 = original["language_model.decoder.layers.2.mlp.experts.local_experts.3.linear_fc1.weight"]
    assert torch.equal(hf["language_model.model.layers.2.mlp.experts.3.up_proj.weight"], fc1[352:])
    assert torch.equal(hf["language_model.model.layers.2.mlp.gate.weight"],
                       original["language_model.decoder.layers.2.mlp.router.weight"])
    assert saved_config(root / "back").moe.layer_pattern(4) == [1, 0, 1, 0]
    back = tensors(load(root / "back"))
    assert back.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key
