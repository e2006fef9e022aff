"""Each CPU patch of megamod.cpu_compat, checked on its own (no CUDA on this machine).

The distributed tests run all of them together through real training steps.
"""

from __future__ import annotations

import importlib
import inspect
import re

import pytest
import torch

from megamod import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="patches apply only without CUDA")


@pytest.fixture(scope="module", autouse=True)
def applied():
    cpu_compat.apply()


def test_torch_cuda_calls_map_to_cpu():
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    x = torch.ones(2)
    assert x.cuda() is x
    torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):
        torch.cuda.current_stream().wait_stream(torch.cuda.default_stream())
    assert not torch.cuda.is_available(), "availability must stay honest"


@pytest.mark.parametrize("module_name", sorted(cpu_compat._CUDA_LITERAL_MODULES))
def test_cuda_literal_modules_allocate_on_cpu(module_name):
    module = importlib.import_module(module_name)
    source = inspect.getsource(module)
    # The patch is still needed: the upstream module still writes the literal.
    assert re.search(r"device\s*=\s*['\"]cuda['\"]", source), f"{module_name}: patch is stale"
    assert cpu_compat._CUDA_LITERAL_MODULES[module_name] in source
    for factory in ("zeros", "tensor", "empty"):
        arg = [0.0] if factory == "tensor" else 1
        assert getattr(module.torch, factory)(arg, device="cuda").device.type == "cpu"
    assert module.torch.float32 is torch.float32  # everything else is plain torch


def test_causal_mask_builds_on_cpu():
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(3)
    assert mask.tolist() == [[False, True, True], [False, False, True], [False, False, False]]


def test_rng_tracker_forks_the_cpu_generator():
    from megatron.core.tensor_parallel import random as mp_random

    seed = 77
    mp_random.model_parallel_cuda_manual_seed(seed, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = mp_random.get_cuda_rng_tracker()
    before = torch.rand(3)
    with tracker.fork():  # the model-parallel stream, seeded seed + 2718 + tp_rank
        forked = torch.rand(3)
    after = torch.rand(3)

    expected_default = torch.Generator().manual_seed(seed)
    assert torch.equal(before, torch.rand(3, generator=expected_default))
    assert torch.equal(after, torch.rand(3, generator=expected_default)), "fork leaked state"
    assert torch.equal(forked, torch.rand(3, generator=torch.Generator().manual_seed(seed + 2718)))
    with tracker.fork():
        assert not torch.equal(torch.rand(3), forked), "the forked stream must advance"


def test_torch_norm_accepts_sequence_parallel():
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                               normalization="RMSNorm", tensor_model_parallel_size=2,
                               sequence_parallel=True)
    norm = WrappedTorchNorm(config, 8, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm) and norm.eps == 1e-6
    assert norm.weight.sequence_parallel is True  # so finalize_model_grads all-reduces it
    assert config.sequence_parallel is True


def test_clip_grads_scales_cpu_grads():
    from megatron.core.optimizer import clip_grads, optimizer

    params = [torch.nn.Parameter(torch.ones(4)) for _ in range(2)]
    for p in params:
        p.grad = torch.full((4,), 2.0)
    assert optimizer.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=4.0)
    for p in params:
        torch.testing.assert_close(p.grad, torch.full((4,), 0.5), rtol=1e-5, atol=0)
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=10.0, total_norm=4.0)
    torch.testing.assert_close(params[0].grad, torch.full((4,), 0.5), rtol=1e-5, atol=0)


def test_mixed_precision_optimizer_takes_cpu_bf16_and_fp16_params():
    """Float16OptimizerWithFloat16Params sorts by CUDA type names: CPU params get fp32
    main copies as on a GPU, and `param.type()` is plain again afterwards."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    bf16 = torch.nn.Parameter(torch.randn(3).bfloat16())
    fp16 = torch.nn.Parameter(torch.randn(4).half())
    fp32 = torch.nn.Parameter(torch.randn(2))
    optimizer = Float16OptimizerWithFloat16Params(
        torch.optim.Adam([bf16, fp16, fp32]), OptimizerConfig(bf16=True), None, lambda *a, **k: None
    )
    assert optimizer.float16_groups == [[bf16, fp16]]
    assert optimizer.fp32_from_fp32_groups == [[fp32]]
    for param in (bf16, fp16):
        assert param.main_param.dtype == torch.float32
        assert torch.equal(param.main_param, param.float())
    assert (bf16.type(), fp16.type(), fp32.type()) == (
        "torch.BFloat16Tensor", "torch.HalfTensor", "torch.FloatTensor")
    assert fp16.type(torch.float32).dtype == torch.float32


def test_dynamic_loss_scale_lives_on_cpu():
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler

    scaler = DynamicGradScaler(initial_scale=8.0, min_scale=2.0, growth_factor=2.0,
                               backoff_factor=0.5, growth_interval=2, hysteresis=2)
    assert scaler.scale.device.type == "cpu"
    scaler.update(True)  # hysteresis: the first overflow leaves the scale
    assert scaler.scale.item() == 8.0
    for expected in (4.0, 2.0, 2.0):  # then halves, down to min_scale
        scaler.update(True)
        assert scaler.scale.item() == expected
