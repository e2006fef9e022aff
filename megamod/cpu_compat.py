"""Run megatron-core 0.16.1 on CPU with gloo: neutralise its CUDA assumptions.

megatron-core is written for GPUs: it asks `torch.cuda` for the current device, RNG
states and streams, calls `Tensor.cuda()`, and allocates small bookkeeping tensors with
`device="cuda"`. On a CPU-only torch every one of those raises. `apply()` redirects them
to the CPU, and is called by `megamod.parallel` only when CUDA is absent, so the GPU
path runs megatron-core untouched.

Four mechanisms, each the narrowest that works:
1. `torch.cuda` functions that cannot work without CUDA (they raise on a CPU build) are
   replaced by CPU equivalents. Nothing that worked before changes meaning.
2. Modules that allocate with a literal `device="cuda"` get a proxy for their global
   name `torch` whose factory functions map that device to the CPU. Only the modules
   listed in `_CUDA_LITERAL_MODULES` (each with the upstream spot it answers).
3. Single upstream functions or classes that cannot be redirected are replaced (RNG
   tracker state get/set, the torch norm wrapper under sequence parallelism, the alltoall
   dispatcher's split sizes) or wrapped (the mixed-precision and distributed optimizers'
   parameter sorting, which names CUDA tensor types; the distributed optimizer's state
   loading, which misses torch AdamW's per-parameter step).
4. `torch.compile` returns what it is given (`compile_nothing`, at `import megamod`, before
   megatron-core decorates its activations with it): compiling them on a CPU costs seconds
   per process and a C++ toolchain, for no speed.

gloo needs no shim: with overlap off, megatron-core's DDP and distributed optimizer call
`reduce_scatter_tensor` and `all_gather_into_tensor` (in `_coalescing_manager`), which
torch 2.13's gloo backend runs on CPU tensors.

Every patch here is exercised by tests/test_cpu_compat.py or the distributed tests
(the distributed optimizer's: tests/training/test_distributed_optimizer.py). Upstream bugs
that are not about the CPU (e.g. MoE's undefined `te_general_gemm` without
transformer-engine) are fixed for every device in `megamod.models.upstream_fixes`.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from typing import Any, Iterator

import torch

_applied = False

_CPU = torch.device("cpu")


def _to_cpu_device(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, torch.device):
        return _CPU if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, int):  # a CUDA ordinal
        return _CPU
    return device


class _CpuStream:
    """Stand-in for `torch.cuda.Stream`: on CPU every op is synchronous, so waiting on
    another stream (param_and_grad_buffer.py's overlap path) is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def record_event(self) -> "_CpuEvent":
        # moe/token_dispatcher.py: the alltoall dispatcher records an event on its
        # device-to-host stream and later synchronises on it.
        return _CpuEvent()


class _CpuEvent:
    """Stand-in for `torch.cuda.Event`: nothing is asynchronous on CPU."""

    def synchronize(self) -> None:
        pass


def _patch_torch_cuda() -> None:
    """Mechanism 1: the `torch.cuda` calls megatron-core makes outside CUDA kernels."""
    cuda = torch.cuda
    # tensor_parallel/layers.py, mappings.py, utils.py, rotary_pos_embedding.py,
    # distributed/param_and_grad_buffer.py ...: `device=torch.cuda.current_device()`.
    cuda.current_device = lambda: _CPU
    # parallel_state.py (timeouts), dist_checkpointing/strategies/filesystem_async.py,
    # distributed_data_parallel.py: `torch.cuda.synchronize()` around collectives.
    cuda.synchronize = lambda device=None: None
    # distributed_data_parallel.py creates a side stream for overlapped grad reduction.
    cuda.Stream = _CpuStream
    cuda.current_stream = lambda device=None: _CpuStream()
    # tensor_parallel/random.py: `model_parallel_cuda_manual_seed` and the tracker's
    # `add` seed and read "the CUDA generator": on CPU that is the default generator.
    cuda.manual_seed = torch.manual_seed
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # models/vision/clip_vit_model.py: `torch.arange(...).cuda()` for position ids.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


class _CpuTorchProxy(types.ModuleType):
    """Mechanism 2: `torch` as seen by a module that writes `device="cuda"` literally."""

    _FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "randn", "rand")

    def __init__(self) -> None:
        super().__init__("torch")
        for name in self._FACTORIES:
            setattr(self, name, self._cpu_factory(getattr(torch, name)))

    @staticmethod
    def _cpu_factory(factory: Any) -> Any:
        def cpu_factory(*args: Any, **kwargs: Any) -> Any:
            if "device" in kwargs:
                kwargs["device"] = _to_cpu_device(kwargs["device"])
            return factory(*args, **kwargs)

        return cpu_factory

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


# Module -> the upstream spot with a literal `device="cuda"` that our paths reach.
_CUDA_LITERAL_MODULES = {
    # forward_backward_no_pipelining: `total_num_tokens = torch.zeros(..., device="cuda")`.
    "megatron.core.pipeline_parallel.schedules": "total_num_tokens",
    # MegatronOptimizer / FP32Optimizer: `found_inf`, `_scale_one`, `_dummy_overflow_buf`.
    "megatron.core.optimizer.optimizer": "found_inf",
    # fp16 loss scaling: MegatronGradScaler's `_scale`, DynamicGradScaler's `min_scale`,
    # `growth_factor`, `backoff_factor`.
    "megatron.core.optimizer.grad_scaler": "backoff_factor",
    # get_grad_norm_fp32 / count_zeros_fp32: `total_norm_cuda`, `dummy_overflow_buf`.
    "megatron.core.optimizer.clip_grads": "total_norm_cuda",
    # local_multi_tensor_l2_norm (grad norm without apex/TE): `l2_cuda = torch.tensor(...)`.
    "megatron.core.utils": "l2_cuda",
    # get_default_causal_mask: `torch.ones(sq, sq, device="cuda")` (local attention).
    "megatron.core.transformer.utils": "get_default_causal_mask",
    # RerunStateMachine.validate_result / state_dict: `device='cuda'` reductions.
    "megatron.core.rerun_state_machine": "val_tensor",
}


def _patch_cuda_literals() -> None:
    proxy = _CpuTorchProxy()
    for module_name in _CUDA_LITERAL_MODULES:
        importlib.import_module(module_name).torch = proxy


def _patch_rng_tracker() -> None:
    """Mechanism 3a: tensor_parallel/random.py reads and writes CUDA generator state
    through private helpers that index `torch.cuda.default_generators` and, on a CPU
    build, silently queue the write with `_lazy_call` (never run): route both to the
    CPU generator so `fork()` really switches streams of random numbers."""
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(
        new_state
    )


def _patch_torch_norm() -> None:
    """Mechanism 3b: transformer/torch_norm.py `WrappedTorchNorm` refuses
    `sequence_parallel`. A per-token norm is exact on sequence-sharded input; its weights
    only need `sequence_parallel=True` so `finalize_model_grads` all-reduces their grads
    over the TP group (as TENorm's are)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    original_new = WrappedTorchNorm.__new__

    # Patch the class in place: several upstream modules imported it by name.
    def new_allowing_sequence_parallel(cls, config, hidden_size, eps=1e-5, **kwargs):
        sequence_parallel = config.sequence_parallel
        config.sequence_parallel = False
        try:
            norm = original_new(cls, config, hidden_size, eps, **kwargs)
        finally:
            config.sequence_parallel = sequence_parallel
        for param in norm.parameters():
            param.sequence_parallel = sequence_parallel
        return norm

    WrappedTorchNorm.__new__ = new_allowing_sequence_parallel


def _patch_clip_grads() -> None:
    """Mechanism 3c: optimizer/clip_grads.py `clip_grad_by_total_norm_fp32` asserts
    `param.grad.type() == 'torch.cuda.FloatTensor'`. Same selection and scaling, with the
    assertion on the dtype only. optimizer/optimizer.py imported it by name."""
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.utils import to_local_if_dtensor

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [
            to_local_if_dtensor(getattr(p, attr)).detach()
            for p in parameters
            if getattr(p, attr, None) is not None
        ]
        assert all(g.dtype == torch.float32 for g in grads), "main grads must be fp32"
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            torch._foreach_mul_(grads, clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


@contextlib.contextmanager
def _parameters_report_cuda_types() -> Iterator[None]:
    """Inside the block, `param.type()` of a CPU `nn.Parameter` names the CUDA type of its
    dtype ('torch.BFloat16Tensor' -> 'torch.cuda.BFloat16Tensor'); `type(dtype)` casts
    and GPU parameters are untouched."""

    def cuda_type_name(self: torch.Tensor, dtype: Any = None, *args: Any, **kwargs: Any) -> Any:
        if dtype is not None or args or kwargs:
            return torch.Tensor.type(self, dtype, *args, **kwargs)
        name = torch.Tensor.type(self)
        return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name

    torch.nn.Parameter.type = cuda_type_name
    try:
        yield
    finally:
        del torch.nn.Parameter.type  # back to torch.Tensor.type


def _patch_float16_optimizer() -> None:
    """Mechanism 3e: optimizer/optimizer.py `Float16OptimizerWithFloat16Params.__init__`
    (~lines 671 and 690; bf16/fp16 training's optimizer) sorts the parameters into fp32
    main copies by `param.type()` in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']
    or == 'torch.cuda.FloatTensor', and raises TypeError for anything else: every CPU
    parameter. While it runs, CPU parameters report the CUDA name of their dtype, so they
    are sorted as on a GPU; the rest of the class is upstream's."""
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    original_init = Float16OptimizerWithFloat16Params.__init__

    def init_accepting_cpu_params(self: Any, *args: Any, **kwargs: Any) -> None:
        with _parameters_report_cuda_types():
            original_init(self, *args, **kwargs)

    Float16OptimizerWithFloat16Params.__init__ = init_accepting_cpu_params


def _patch_distributed_optimizer() -> None:
    """Mechanism 3f: optimizer/distrib_optimizer.py `DistributedOptimizer.__init__` sorts
    the parameters as the mixed-precision optimizer does (~line 582: which get a sharded
    fp32 `main_param`; `_build_model_and_main_param_groups` ~lines 361 and 420: fp32 main
    shards of bf16/fp16 params, or views of fp32 ones) by CUDA type names, and raises
    TypeError for every CPU parameter. While it runs, CPU parameters report the CUDA name
    of their dtype; the rest of the class is upstream's."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original_init = DistributedOptimizer.__init__

    def init_accepting_cpu_params(self: Any, *args: Any, **kwargs: Any) -> None:
        with _parameters_report_cuda_types():
            original_init(self, *args, **kwargs)

    DistributedOptimizer.__init__ = init_accepting_cpu_params

    # ~line 935, `_set_main_param_and_optimizer_states`: copies every entry of the shard's
    # Adam state from the loaded tensors, but the loaded ones (~line 2095,
    # `load_parameter_state_from_fully_reshardable`) never hold "step", which only torch's
    # AdamW (the optimizer without apex/TE, i.e. on CPU) keeps per parameter: KeyError at
    # every resume. `load_state_dict` has already set that step from the checkpoint's
    # param groups (~line 805): keep it.
    original_set = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states_keeping_step(self: Any, model_param: Any, tensors: dict) -> None:
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            if "step" in self.optimizer.state[main_param]:
                tensors = {**tensors, "step": self.optimizer.state[main_param]["step"]}
        original_set(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states_keeping_step


def _patch_moe() -> None:
    """Mechanism 3d: megatron-core's MoE on CPU (local experts, no TE):
    moe/token_dispatcher.py (alltoall) moves split sizes to the host with
    `maybe_move_tensor_to_cpu(..., as_numpy=True)`, which converts only CUDA tensors; on
    CPU the tensors reach `all_to_all_single` as split sizes (TypeError). The replacement
    converts CPU tensors to numpy too, as the GPU path returns."""
    from megatron.core.transformer.moe import token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.cpu().numpy()
        return tensor

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _identity_compile(model: Any = None, **options: Any) -> Any:
    """`torch.compile`'s two forms, `torch.compile(fn, ...)` and `@torch.compile(...)`,
    returning the function itself."""
    return model if model is not None else (lambda fn: fn)


def compile_nothing() -> None:
    """Mechanism 4: megatron-core's `jit_fuser` is `torch.compile` (activations.py's
    `quick_gelu`, the CLIP encoder's activation, among others). On a CPU, inductor builds
    those kernels with g++ in every new process: 6-10 s of each rank's start on 2 cores, a
    C++ toolchain as a run-time dependency, and ranks compiling at once raced on the
    precompiled header of its shared cache (g++: "'at::vec' has not been declared"); and
    merely decorating them imports dynamo and inductor (~1-2 s of every process's start).
    The fusion buys nothing on a CPU, so without CUDA `import megamod` makes `torch.compile`
    return what it is given, before megatron-core is imported: those functions are plain
    functions and nothing is compiled anywhere in the process (which runs nothing on a
    GPU). `apply()` covers a process that imported megatron-core first: dynamo is switched
    off, and the decorated functions run eagerly. The GPU path keeps megatron-core's
    fusion."""
    if not torch.cuda.is_available():
        torch.compile = _identity_compile


def _activations_run_eagerly() -> None:
    """Mechanism 4 when megatron-core was imported before megamod (see `compile_nothing`):
    functions it decorated are dynamo's wrappers, which run eagerly once dynamo is off.
    Dynamo loaded means something was decorated; otherwise there is nothing to switch."""
    if "torch._dynamo" in sys.modules:
        sys.modules["torch._dynamo"].config.disable = True


def apply() -> None:
    """Apply every CPU patch once. Must run before any megatron-core model is built."""
    global _applied
    if _applied:
        return
    assert not torch.cuda.is_available(), "cpu_compat is for machines without CUDA"
    _patch_torch_cuda()
    _patch_cuda_literals()
    _patch_rng_tracker()
    _patch_torch_norm()
    _patch_clip_grads()
    _patch_float16_optimizer()
    _patch_distributed_optimizer()
    _patch_moe()
    _activations_run_eagerly()
    _applied = True
