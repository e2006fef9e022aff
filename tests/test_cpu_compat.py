"""megamod.cpu_compat by what each patch is for: the megatron-core code path it answers runs
on this CPU and computes what a reference without megatron-core computes (plain torch, or
numbers by hand). Without the patch each of these raises or computes something else; the
test names the patch it covers. The patches are not applied where CUDA is present
(simulated), and the spots they answer still exist upstream.

The distributed tests run the same paths at TP/EP/DP > 1 through real training steps.
"""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megamod import cpu_compat
from tests.launcher import REPO, world_of_one

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="patches apply only without CUDA")


@pytest.fixture(scope="module", autouse=True)
def world():
    """A world of one (gloo): megamod.parallel applies the patches, as in every command."""
    with world_of_one() as config:
        yield config


def transformer_config(**kwargs):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(**{"num_layers": 1, "hidden_size": 8, "num_attention_heads": 2,
                                "use_cpu_initialization": False, **kwargs})


# ------------------------------------------------------------------ applied without CUDA only


def test_cuda_machines_never_get_the_patches(monkeypatch):
    """With CUDA present, init_distributed picks the GPU and NCCL and never calls apply();
    apply() itself refuses (stopped here before a process group is made)."""
    from megamod import parallel

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(cpu_compat, "apply", lambda: calls.append("apply"))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)

    class Stop(Exception):
        pass

    def init_process_group(backend, **kwargs):
        calls.append(("init_process_group", backend))
        raise Stop

    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    with pytest.raises(Stop):
        parallel.init_distributed(load_tiny().parallel, 1)
    assert calls == [("set_device", 0), ("init_process_group", "nccl")]

    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_compat, "_applied", False)
    with pytest.raises(AssertionError, match="without CUDA"):
        cpu_compat.apply()


def test_patched_torch_still_reports_no_cuda():
    """The patches give CPU answers to CUDA calls but never claim CUDA: megamod's own
    device choices (GPU or CPU, NCCL or gloo, fp8's refusal) read torch.cuda.is_available."""
    assert cpu_compat._applied and not torch.cuda.is_available()
    assert torch.cuda.current_device() == torch.device("cpu")  # (patched, for megatron-core)


def load_tiny():
    from megamod.config import load_config
    from tests.launcher import TINY_CONFIG

    return load_config(TINY_CONFIG)


@pytest.mark.parametrize("module_name", sorted(cpu_compat._CUDA_LITERAL_MODULES))
def test_the_cuda_literals_answered_are_still_upstream(module_name):
    """Each module patched for a literal `device="cuda"` still writes it at the spot named
    (a megatron-core upgrade that drops it makes the patch stale)."""
    source = inspect.getsource(importlib.import_module(module_name))
    assert re.search(r"device\s*=\s*['\"]cuda['\"]", source), f"{module_name}: patch is stale"
    assert cpu_compat._CUDA_LITERAL_MODULES[module_name] in source


# ----------------------------------------- a training step: DDP, schedule, optimizer, clipping


class TinyMLP(torch.nn.Module):
    """A megatron-core tensor-parallel MLP (weights allocated on `torch.cuda.current_device()`)."""

    def __init__(self, config) -> None:
        from megatron.core.enums import ModelType
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        self.config = config
        self.model_type = ModelType.encoder_or_decoder  # the schedule reads both
        init = lambda w: torch.nn.init.normal_(w, std=0.5)  # noqa: E731
        self.fc1 = ColumnParallelLinear(8, 16, config=config, init_method=init, bias=True,
                                        gather_output=False)
        self.fc2 = RowParallelLinear(16, 4, config=config, init_method=init, bias=True,
                                     input_is_parallel=True, skip_bias_add=False)

    def set_input_tensor(self, tensor) -> None:  # pipeline stages only
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)[0]))[0]


def reference_mlp(model: TinyMLP) -> torch.nn.Sequential:
    plain = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    with torch.no_grad():
        for mine, theirs in ((plain[0], model.fc1), (plain[2], model.fc2)):
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
    return plain


@pytest.mark.parametrize("distributed", [False, True], ids=["fp32_optimizer", "distributed_optimizer"])
def test_a_training_step_equals_plain_torch(distributed):
    """megatron-core's DDP, forward_backward_no_pipelining and fp32 optimizer (or the
    distributed optimizer) with gradient clipping against torch.nn modules, clip_grad_norm_
    and AdamW on the same data. Patches: torch.cuda.current_device (tensor-parallel
    weights, DDP buffers), the `device="cuda"` literals of pipeline_parallel.schedules
    (total_num_tokens), optimizer.optimizer (FP32Optimizer's _scale), optimizer.clip_grads
    (total_norm_cuda) and utils (l2_cuda, the grad norm without apex),
    clip_grad_by_total_norm_fp32, and DistributedOptimizer's parameter sorting."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

    torch.manual_seed(0)
    config = transformer_config()
    model = TinyMLP(config)
    assert model.fc1.weight.device.type == "cpu"
    plain = reference_mlp(model)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               use_distributed_optimizer=distributed)
    ddp = DistributedDataParallel(config, ddp_config, model)
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=0.05, weight_decay=0.0, clip_grad=0.5,
                        use_distributed_optimizer=distributed), [ddp])
    micro_batches = [(torch.randn(5, 8), torch.randn(5, 4)) for _ in range(3)]

    def forward_step(data, model):
        x, y = next(data)
        return model(x), lambda out: (F.mse_loss(out, y), {})

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward_no_pipelining(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[ddp],
        num_microbatches=len(micro_batches), seq_length=5, micro_batch_size=1)
    success, grad_norm, _ = optimizer.step()

    reference = torch.optim.AdamW(plain.parameters(), lr=0.05, weight_decay=0.0)
    sum(F.mse_loss(plain(x), y) for x, y in micro_batches).div(len(micro_batches)).backward()
    expected_norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), max_norm=0.5)
    reference.step()

    assert success and expected_norm > 0.5  # the clipping acted
    # fp32 sums in another order: measured 6.0e-9 relative on the norm, 6.0e-8 absolute on
    # the parameters (an update is 0.05 each).
    assert grad_norm == pytest.approx(expected_norm.item(), rel=1.2e-8)
    for mine, theirs in ((model.fc1, plain[0]), (model.fc2, plain[2])):
        torch.testing.assert_close(mine.weight, theirs.weight, rtol=0, atol=1.2e-7)
        torch.testing.assert_close(mine.bias, theirs.bias, rtol=0, atol=1.2e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_optimizer_steps_cpu_params_like_torch(dtype):
    """Float16OptimizerWithFloat16Params (patched: it sorts params by CUDA type names) on
    CPU bf16 / fp16 params: Adam on fp32 main copies with the fp32 main gradients (as DDP
    accumulates them; fp16's unscaled by the loss scale), the params their 16-bit rounding;
    fp32 params updated in place. Also the `found_inf` / `_scale_one` literals of
    optimizer.optimizer and the scale of grad_scaler (ConstantGradScaler)."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    torch.manual_seed(1)
    half = torch.nn.Parameter(torch.randn(6).to(dtype))
    full = torch.nn.Parameter(torch.randn(3))
    master = [half.detach().float().clone(), full.detach().clone()]
    scale = 1024.0 if dtype == torch.float16 else 1.0
    # What DDP's fp32 buffers hold: the gradients of the scaled loss.
    half.main_grad, full.main_grad = torch.randn(6) * scale, torch.randn(3) * scale
    unscaled = [half.main_grad / scale, full.main_grad / scale]  # (unscaled in place below)

    fp16 = dtype == torch.float16
    optimizer = Float16OptimizerWithFloat16Params(
        torch.optim.AdamW([half, full], lr=0.1, weight_decay=0.0),
        OptimizerConfig(bf16=not fp16, fp16=fp16, lr=0.1, weight_decay=0.0),
        ConstantGradScaler(scale) if fp16 else None, lambda *args, **kwargs: None)
    assert optimizer.step()[0]
    assert (half.type(), full.type()) == (torch.Tensor.type(half), "torch.FloatTensor")

    reference = [torch.nn.Parameter(p.clone()) for p in master]
    reference[0].grad, reference[1].grad = unscaled
    torch.optim.AdamW(reference, lr=0.1, weight_decay=0.0).step()
    # Measured: at most 1 ulp apart (9.2e-8 relative).
    torch.testing.assert_close(half.main_param, reference[0].detach(), rtol=2e-7, atol=0)
    torch.testing.assert_close(full, reference[1], rtol=2e-7, atol=0)
    assert torch.equal(half, half.main_param.to(dtype))  # copied back, rounded
    assert not torch.equal(half, master[0].to(dtype))  # and it did change


def test_dynamic_loss_scale_follows_its_rule_on_cpu():
    """DynamicGradScaler's scale tensors (`device="cuda"` literals of grad_scaler): the
    scale lives on the CPU and backs off and grows as its rule says: hysteresis 2 absorbs
    one overflow, then halves down to min_scale, and growth_interval clean steps double it."""
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler

    scaler = DynamicGradScaler(initial_scale=8.0, min_scale=2.0, growth_factor=2.0,
                               backoff_factor=0.5, growth_interval=2, hysteresis=2)
    assert scaler.scale.device.type == "cpu"
    scales = []
    for found_inf in (True, True, True, True, False, False):
        scaler.update(found_inf)
        scales.append(scaler.scale.item())
    assert scales == [8.0, 4.0, 2.0, 2.0, 2.0, 4.0]


# ----------------------------------------------------------------------------- RNG


def test_rng_tracker_forks_the_cpu_generator():
    """model_parallel_cuda_manual_seed and the tracker's add/fork (patched: cuda.manual_seed,
    cuda.get_rng_state and the tracker's private _get/_set_cuda_rng_state): the default
    stream is torch.Generator seeded `seed`, the forked model-parallel one `seed + 2718`
    (TP rank 0), and forking leaves the default stream where it was."""
    from megatron.core.tensor_parallel import random as mp_random

    seed = 77
    mp_random.model_parallel_cuda_manual_seed(seed, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = mp_random.get_cuda_rng_tracker()
    before = torch.rand(3)
    with tracker.fork():
        forked = torch.rand(3)
    after = torch.rand(3)

    expected_default = torch.Generator().manual_seed(seed)
    assert torch.equal(before, torch.rand(3, generator=expected_default))
    assert torch.equal(after, torch.rand(3, generator=expected_default)), "fork leaked state"
    assert torch.equal(forked, torch.rand(3, generator=torch.Generator().manual_seed(seed + 2718)))
    with tracker.fork():
        assert not torch.equal(torch.rand(3), forked), "the forked stream must advance"


def test_cuda_rng_state_round_trips():
    """torch.cuda.get_rng_state / set_rng_state (rerun_state_machine's save/restore; a
    silent no-op on a CPU build without the patch): restoring replays the same draws."""
    state = torch.cuda.get_rng_state()
    first = torch.rand(4)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(4), first)


# ---------------------------------------------------------------------- model building blocks


def test_torch_norm_takes_sequence_parallel_and_normalises():
    """WrappedTorchNorm refuses sequence_parallel upstream (patched): built with it, it is
    RMSNorm by hand, and its weight is flagged for finalize_model_grads' TP all-reduce."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    config = transformer_config(normalization="RMSNorm", tensor_model_parallel_size=2,
                                sequence_parallel=True)
    norm = WrappedTorchNorm(config, 8, eps=1e-6)
    assert config.sequence_parallel is True  # the config is left as it was
    assert norm.weight.sequence_parallel is True
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 2, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    # Measured: at most 2.4e-7 apart (torch's fused rms_norm against these steps).
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=5e-7)


def test_causal_mask_builds_on_cpu():
    """get_default_causal_mask (`device="cuda"` literal of transformer.utils): True above the
    diagonal, by hand."""
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(3)
    assert mask.tolist() == [[False, True, True], [False, False, True], [False, False, False]]


def test_vision_embeddings_use_positions_0_to_n(world):
    """CLIPViTModel's position ids come from `torch.arange(...).cuda()` (patched:
    Tensor.cuda): the decoder's input is, by hand, LayerNorm(conv patches with the class
    token in front + position embeddings 0..n)."""
    from megamod.data.tokenizer import load_tokenizer
    from megamod.models.build import build_model

    vit = build_model(world, load_tokenizer("tiny")).vision_model
    seen = []
    vit.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images = torch.randn(2, 3, vit.img_h, vit.img_w)
    with torch.no_grad():
        vit(images)
        patches = F.conv2d(images, vit.conv1.weight, stride=vit.patch_dim)
        patches = patches.flatten(2).transpose(1, 2)
        tokens = torch.cat([vit.class_token.expand(2, -1, -1), patches], dim=1)
        tokens = tokens + vit.position_embeddings.weight[: tokens.shape[1]]
        expected = F.layer_norm(tokens, (tokens.shape[-1],), vit.ln_pre.weight, vit.ln_pre.bias,
                                vit.ln_pre.eps)
    assert torch.equal(seen[0].transpose(0, 1), expected)  # the same torch ops: measured equal


def test_moe_layer_with_the_alltoall_dispatcher_equals_a_moe_by_hand():
    """megatron-core's MoELayer (router with fp32 gating, alltoall dispatcher, sequential
    local experts) against top-2 routing by hand. Patches: torch.cuda.Stream /
    current_stream / Event synchronisation (the dispatcher's device-to-host stream) and
    current_device (the router moves its weights there). The fp32 gating also needs
    moe_utils.te_general_gemm defined without TE: not a CPU patch but an upstream fix for
    every device (megamod.models.upstream_fixes, tests/models/test_gpu_path.py), applied
    here as build_model applies it."""
    from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec
    from megatron.core.transformer.spec_utils import build_module

    from megamod.models import upstream_fixes

    upstream_fixes.apply()
    torch.manual_seed(2)
    config = transformer_config(num_moe_experts=4, moe_router_topk=2, add_bias_linear=False,
                                moe_token_dispatcher_type="alltoall", moe_router_dtype="fp32",
                                moe_aux_loss_coeff=0.0, ffn_hidden_size=12)
    layer = build_module(get_mlp_module_spec(use_te=False, num_experts=4), config=config)
    layer.eval()
    x = torch.randn(5, 2, 8)
    with torch.no_grad():
        output, _ = layer(x)
        tokens = x.reshape(-1, 8)
        logits = tokens @ layer.router.weight.t()
        top, chosen = logits.topk(2, dim=-1)
        weights = torch.softmax(top, dim=-1)  # softmax over the top-k logits (upstream's default)
        expected = torch.zeros_like(tokens)
        for expert_id, expert in enumerate(layer.experts.local_experts):
            hidden = F.gelu(tokens @ expert.linear_fc1.weight.t()) @ expert.linear_fc2.weight.t()
            gate = (weights * (chosen == expert_id)).sum(-1, keepdim=True)
            expected += gate * hidden
    assert {int(e) for e in chosen.flatten()} == {0, 1, 2, 3}  # every expert had work
    # Measured: at most 3.5e-10 apart (outputs ~5e-4, at most 2e-3: the default init).
    torch.testing.assert_close(output.reshape(-1, 8), expected, rtol=0, atol=7e-10)


def test_alltoall_split_sizes_reach_the_collective():
    """The alltoall dispatcher hands `all_to_all` split sizes through
    maybe_move_tensor_to_cpu(..., as_numpy=True) (patched to convert CPU tensors, as the
    GPU path does): the collective accepts them and moves the rows (EP group of one)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe import token_dispatcher

    splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3]), as_numpy=True)
    assert isinstance(splits, np.ndarray) and splits.tolist() == [3]
    rows = torch.arange(6.0).reshape(3, 2)
    out = torch.empty_like(rows)
    # megatron-core's all_to_all skips a group of one; this is the collective it calls.
    torch.distributed.all_to_all_single(
        out, rows, output_split_sizes=splits, input_split_sizes=splits,
        group=parallel_state.get_expert_model_parallel_group())
    assert torch.equal(out, rows)


# -------------------------------------------------------------------- checkpointing, rerun


def test_dist_checkpoint_round_trip(tmp_path):
    """dist_checkpointing save and load on CPU (patched: torch.cuda.synchronize, called
    after its non-blocking copies to the host): the loaded tensors are the saved ones."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    saved = {"a": torch.randn(4, 3), "b": torch.arange(5.0)}
    dist_checkpointing.save({k: ShardedTensor.from_rank_offsets(k, v.clone(), replica_id=0)
                             for k, v in saved.items()}, str(tmp_path))
    template = {k: ShardedTensor.from_rank_offsets(k, torch.zeros_like(v), replica_id=0)
                for k, v in saved.items()}
    loaded = dist_checkpointing.load(template, str(tmp_path))
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())


def test_rerun_state_machine_reduces_flags_on_cpu():
    """RerunStateMachine._reduce_any (`device='cuda'` literal of rerun_state_machine; reached
    when a rerun mode is on): any rank's True is True, over a world of one by hand."""
    from megatron.core.rerun_state_machine import RerunMode, RerunStateMachine

    machine = RerunStateMachine(mode=RerunMode.VALIDATE_RESULTS)
    assert machine._reduce_any([True, False]) == (True, False)
    assert machine._reduce_any(False) is False and machine._reduce_any(True) is True


def test_importing_megamod_first_compiles_nothing():
    """Mechanism 4 as a rank meets it (`python -m megamod`): megamod imported before
    megatron-core, whose `torch.compile`d activations are then the plain functions, and
    neither dynamo nor inductor is ever imported (their import alone costs a process
    seconds), through building and running a model."""
    script = """
import sys
import megamod
import torch
from megatron.core.activations import quick_gelu
from megatron.core.fusions.fused_bias_geglu import bias_geglu_impl
assert not hasattr(quick_gelu, "_torchdynamo_orig_callable"), "quick_gelu was wrapped by dynamo"
x = torch.randn(3, 37)
assert torch.equal(quick_gelu(x), x * torch.sigmoid(1.702 * x))
from tests.launcher import TINY_CONFIG, world_of_one
from megamod.config import load_config
from megamod.data.tokenizer import load_tokenizer
from megamod.models.build import build_model
with world_of_one([]):
    config = load_config(TINY_CONFIG, [])
    model = build_model(config, load_tokenizer("tiny"))
    image = torch.zeros(1, 3, config.model.vision.image_size, config.model.vision.image_size)
    model.vision_model(image).sum().backward()
loaded = sorted(m for m in ("torch._dynamo", "torch._inductor.compile_fx") if m in sys.modules)
assert not loaded, loaded
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_compiled_activations_run_eagerly():
    """Mechanism 4 in this process, where megatron-core may come before megamod:
    megatron-core's `torch.compile`d `quick_gelu` (the CLIP encoder's activation) runs
    without dynamo on CPU: no frame is compiled, and it computes x * sigmoid(1.702 x)
    exactly as the eager formula does."""
    from megatron.core.activations import quick_gelu
    from torch._dynamo.utils import counters

    compiled_before = dict(counters["frames"])
    x = torch.randn(3, 37)
    assert torch.equal(quick_gelu(x), x * torch.sigmoid(1.702 * x))
    assert dict(counters["frames"]) == compiled_before
