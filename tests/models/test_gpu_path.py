"""The GPU path's device-independent parts, run on this CPU: where build_model puts a model,
the activation functions a GPU's configs compute, and MoE's router without
transformer-engine whatever cpu_compat did. (What only a GPU shows:
benchmarks/gpu_check.sh.)
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tests.launcher import world_of_one

MOE = ["moe.num_experts=2", "moe.layer_freq=2", "logging.tensorboard_dir=null"]


@pytest.fixture(scope="module")
def world():
    """A world of one (gloo) for the tiny model with MoE layers."""
    with world_of_one(MOE) as config:
        yield config


@pytest.fixture(scope="module")
def tokenizer(world):
    from megamod.data.tokenizer import load_tokenizer

    return load_tokenizer(world.data.tokenizer)


# --------------------------------------------------------------------------- placement


def test_build_model_puts_the_whole_model_on_its_device(world, tokenizer):
    """Every tensor, the ViT's plain-torch patch conv, class token and position
    embeddings included (built on the CPU where megatron-core builds its layers on the
    GPU), ends on the device build_model is given: the meta device here, which any CPU
    tensor can move to."""
    from megamod.models.build import build_model

    model = build_model(world, tokenizer, device=torch.device("meta"))
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert "vision_model.conv1.weight" in tensors and "vision_model.class_token" in tensors
    assert {name for name, t in tensors.items() if not t.is_meta} == set()


def test_the_default_device_is_this_ranks_gpu_else_the_cpu(monkeypatch):
    from megamod.models.build import model_device

    assert model_device() == torch.device("cpu")
    with torch.device("meta"):  # the dry-run's build stays on the meta device
        assert model_device() == torch.device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # set by init_distributed
    assert model_device() == torch.device("cuda", 3)


# ---------------------------------------------------------------------------- GELU


def test_the_gpu_configs_projector_computes_exact_gelu(world):
    """The projector built from the configs a GPU gets (megatron-core's fused bias-GELU is
    the tanh approximation): its output is LLaVA's `gelu` MLP, told apart from tanh-GELU."""
    from megatron.core.models.vision.multimodal_projector import MultimodalProjector

    from megamod.models.specs import projector_submodules
    from megamod.models.transformer_configs import transformer_configs

    configs = transformer_configs(world, on_gpu=True)
    width = world.model.vision.hidden_size
    projector = MultimodalProjector(configs.projector, projector_submodules(use_te=False),
                                    projector_type="mlp", input_size=width)
    fc1, fc2 = projector.encoder.linear_fc1, projector.encoder.linear_fc2
    torch.manual_seed(0)
    x = torch.randn(5, 2, width)
    with torch.no_grad():
        for param in projector.parameters():  # pre-activations of order 1, where they differ
            param.normal_(0.0, width ** -0.5)
        output = projector(x)
        hidden = x @ fc1.weight.t() + fc1.bias
        exact = F.gelu(hidden) @ fc2.weight.t() + fc2.bias
        tanh = F.gelu(hidden, approximate="tanh") @ fc2.weight.t() + fc2.bias
    assert (exact - tanh).abs().max() > 1e-4  # the two are distinguishable here
    torch.testing.assert_close(output, exact, rtol=0, atol=2e-6)


def test_the_gpu_configs_build_for_a_plain_gelu_decoder(world):
    """A decoder without SwiGLU (and without biases) on a GPU: megatron-core refuses to
    fuse a bias-less GELU, and its fused GELU is tanh-GELU; the configs leave it unfused."""
    from megamod.models.transformer_configs import transformer_configs

    language = dataclasses.replace(world.model.language, swiglu=False)
    config = dataclasses.replace(world, model=dataclasses.replace(world.model, language=language))
    configs = transformer_configs(config, on_gpu=True)
    assert configs.language.activation_func is F.gelu
    assert not configs.language.bias_activation_fusion


# ----------------------------------------------------------------------------- MoE


def test_moe_gating_needs_no_transformer_engine_nor_cpu_compat(world, tokenizer, monkeypatch):
    """megatron-core's fp32 router gating reads `te_general_gemm`, defined upstream only
    when transformer-engine imports. build_model defines it whatever the device: here
    after removing what the CPU patches may have left."""
    from megatron.core.transformer.moe import moe_utils

    from megamod.models.build import build_model

    monkeypatch.delattr(moe_utils, "te_general_gemm", raising=False)
    model = build_model(world, tokenizer)
    router = model.routers()[0]
    assert router.config.moe_router_dtype == "fp32"
    x = torch.randn(6, 1, world.model.language.hidden_size)
    with torch.no_grad():
        logits = router.gating(x)
    torch.testing.assert_close(logits, x @ router.weight.t(), rtol=1e-6, atol=1e-6)
