"""`megamod convert` with a model built from transformer-engine's specs (a GPU with TE):
its state_dict() names differ from the local spec's, and both directions must map them.

No TE here: the TE-named state dict is made from the local one by the names upstream
gives. The layer norms: the `sharded_state_dict_keys_map` of megatron-core's local GPT
layer spec and of megamod's local ViT spec (each maps a local name to the name the TE
spec's fused `TELayerNormColumnParallelLinear` has). A MoE layer keeps its own pre-MLP
norm (TE's spec fuses none there: `pre_mlp_layernorm` is a TENorm), and its grouped-GEMM
experts (TEGroupedMLP) are one `linear_fc1` / `linear_fc2` whose `GroupedLinear` holds
expert e's weight as `weight{e}`. TE linears also carry `_extra_state`.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.launcher import world_of_one

MOE = ["moe.num_experts=2", "moe.layer_freq=2"]  # MoE on decoder layers 0 and 2 of 4


@pytest.fixture(scope="module")
def world():
    with world_of_one(["logging.tensorboard_dir=null"]) as config:
        yield config


def te_named(local: dict[str, torch.Tensor], moe_layers: list[int]) -> dict[str, torch.Tensor]:
    """`local` (a megamod LLaVA's state dict, local-spec names) as a TE-spec model's
    state_dict() would name it (see the module docstring)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megamod.models.specs import vision_layer_spec

    norm_maps = {
        "language_model.": get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map,
        "vision_model.": vision_layer_spec(use_te=False).submodules.sharded_state_dict_keys_map,
    }
    moe_prefixes = {f"language_model.decoder.layers.{i}." for i in moe_layers}
    out = {}
    for key, tensor in local.items():
        layer = re.match(r"(\w+\.decoder\.layers\.\d+\.)(.*)$", key)
        if layer is None:
            out[key] = tensor
            continue
        prefix, name = layer.groups()
        expert = re.match(r"mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$", name)
        if expert:
            name = f"mlp.experts.{expert[2]}.weight{expert[1]}"
        elif not (prefix in moe_prefixes and name.startswith("pre_mlp_layernorm.")):
            for local_name, te_name in norm_maps[prefix.split(".")[0] + "."].items():
                if name.startswith(local_name):
                    name = te_name + name.removeprefix(local_name)
        out[prefix + name] = tensor
        if name.endswith("linear_qkv.weight"):
            out[prefix + name.replace("weight", "_extra_state")] = None  # TE's FP8 metadata
    return out


@pytest.fixture(scope="module", params=["dense", "moe"])
def models(world, request) -> tuple[dict, dict, object]:
    """(local-spec state dict, TE-spec state dict, config) of the tiny LLaVA as the tools'
    `build_model` builds it here (local specs), every tensor drawn at random so that a
    mix-up shows."""
    from megamod.config import load_config
    from megamod.data.tokenizer import load_tokenizer
    from megamod.models.build import build_model
    from tests.launcher import TINY_CONFIG

    config = load_config(TINY_CONFIG, MOE if request.param == "moe" else [])
    torch.manual_seed(0)
    model = build_model(config, load_tokenizer("tiny"))
    local = {k: v.normal_() for k, v in model.state_dict().items()
             if not k.endswith("_extra_state")}
    pattern = config.moe.layer_pattern(config.model.language.num_layers)
    moe_layers = [i for i, is_moe in enumerate(pattern) if is_moe]
    te = te_named(local, moe_layers)
    assert any("layer_norm_" in k for k in te)  # the two namings differ where TE fuses
    if request.param == "moe":
        assert "language_model.decoder.layers.2.mlp.experts.linear_fc1.weight1" in te
        assert "language_model.decoder.layers.2.pre_mlp_layernorm.weight" in te
    return local, te, config


def test_to_hf_takes_a_te_models_state_dict(models):
    """`megamod convert --to hf` of a model built on a GPU with TE (`to_hf(model.state_dict())`)
    writes exactly what the local model's conversion writes."""
    from megamod.convert.hf import to_hf

    local, te, config = models
    from_local, hf_config = to_hf(local, config, image_token_id=3)
    from_te, te_config = to_hf(te, config, image_token_id=3)
    assert from_te.keys() == from_local.keys() and te_config == hf_config
    assert all(torch.equal(from_te[k], v) for k, v in from_local.items())


def test_from_hf_tensors_take_the_names_of_the_model_they_load_into(models):
    """`megamod convert` to megamod loads `from_hf`'s tensors into the model it builds:
    `module_names` gives them that model's names, TE's or the local spec's."""
    from megamod.convert.hf import module_names

    local, te, _ = models
    tensors = {k: v for k, v in te.items() if not k.endswith("_extra_state")}
    renamed = module_names(local, te.keys())
    assert renamed.keys() == tensors.keys()
    assert all(renamed[k] is v for k, v in tensors.items())
    assert module_names(local, local.keys()) == local
