"""Distributed start-up: process group, megatron-core parallel state, seeds.

Works under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR), under Slurm's
`srun` (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, master = first host of
SLURM_NODELIST) and as a single plain process. NCCL with one GPU per local rank when
CUDA is present; gloo on CPU, after `cpu_compat` has neutralised megatron-core's CUDA
assumptions.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import re
import socket
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from megamod.config import Config, ParallelConfig
from megamod.errors import ConfigError, MegamodError
from megamod.precision import check_fp8_supported
from megamod.process_hygiene import die_with_parent, helpers_die_with_us


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[003-005,007],cpu1' -> 'gpu003'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ValueError(f"cannot parse SLURM_NODELIST={nodelist!r}")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def dist_env_from(environ: os._Environ | dict) -> DistEnv:
    """Read rank and rendezvous from torchrun's variables, else Slurm's, else single."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        job_id = int(environ.get("SLURM_JOB_ID", 0))
        return DistEnv(
            rank=int(environ["SLURM_PROCID"]),
            world_size=int(environ["SLURM_NTASKS"]),
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
            master_addr=environ.get("MASTER_ADDR")
            or first_slurm_host(environ.get("SLURM_NODELIST", "127.0.0.1")),
            # A port derived from the job id lets several jobs share a node.
            master_port=int(environ.get("MASTER_PORT", 20000 + job_id % 20000)),
        )
    # No launcher: a port of our own (a fixed default collides with any other one-process
    # run on the machine), unless the user set one.
    port = int(environ["MASTER_PORT"]) if "MASTER_PORT" in environ else free_port()
    return DistEnv(0, 1, 0, "127.0.0.1", port)


def die_with_launcher(launcher_pid: int) -> None:
    """Under torchrun, have the kernel kill this worker when torchrun dies: after a
    `kill -9` of torchrun its workers would otherwise train on and keep saving into the
    save_dir. `launcher_pid`: this process's parent as read at start-up (`os.getppid()`).
    Under srun, slurmstepd already kills the tasks of a killed step."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent(launcher_pid)


def free_port() -> int:
    """A TCP port no one listens on now (for a one-process tool's own rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ParallelLayout:
    """How `world_size` ranks split into megatron-core's groups: the sizes of a rank's
    groups (tensor, pipeline, data; and for experts: expert, expert-tensor, expert-data)."""

    world_size: int
    tp: int
    pp: int
    dp: int
    ep: int
    etp: int
    expert_dp: int


def parallel_layout(parallel: ParallelConfig, world_size: int) -> ParallelLayout:
    """`parallel`'s layout over `world_size` ranks, as `initialize_model_parallel` builds
    it; ConfigError when the ranks do not split into its groups. Pure: `megamod train
    --dry-run` checks a world of N ranks with it, without starting one."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    ep, etp = parallel.expert_model_parallel_size, parallel.expert_tensor_parallel_size or tp
    if world_size % (tp * pp) or world_size % (ep * etp * pp):
        raise ConfigError(
            f"{world_size} processes cannot be split into tensor_model_parallel_size="
            f"{tp} x pipeline_model_parallel_size={pp} groups, or into "
            f"expert_model_parallel_size={ep} x expert_tensor_parallel_size={etp} x "
            f"pipeline_model_parallel_size={pp} groups: change parallel.* or the process count"
        )
    return ParallelLayout(world_size, tp, pp, world_size // (tp * pp), ep, etp,
                          world_size // (ep * etp * pp))


def cuda_device_index(local_rank: int, visible_devices: int) -> int:
    """This rank's GPU among the `visible_devices` it sees: its local rank when every rank
    of the node sees every GPU (torchrun, plain srun), else modulo the count: under
    per-task GPU binding (`srun --gpus-per-task=1`, `--gpu-bind`) each task sees only
    its own GPU(s) (CUDA_VISIBLE_DEVICES), numbered from 0, while SLURM_LOCALID still
    counts the node's tasks."""
    if visible_devices < 1:
        raise ValueError(f"no visible CUDA device for local rank {local_rank}")
    return local_rank % visible_devices


def init_distributed(parallel: ParallelConfig, seed: int) -> DistEnv:
    """Create the default process group and megatron-core's parallel groups."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.rerun_state_machine import (
        RerunMode,
        destroy_rerun_state_machine,
        initialize_rerun_state_machine,
    )

    helpers_die_with_us()  # megatron-core's checkpoint writer's processes die with this rank
    env = dist_env_from(os.environ)
    parallel_layout(parallel, env.world_size)
    if torch.cuda.is_available():
        torch.cuda.set_device(cuda_device_index(env.local_rank, torch.cuda.device_count()))
        backend = "nccl"
    else:
        from megamod import cpu_compat

        cpu_compat.apply()
        backend = "gloo"
    if not torch.distributed.is_initialized():
        if env.world_size == 1 and "MASTER_PORT" not in os.environ:
            # One process, no launcher: an in-memory store, no port to race other jobs for.
            rendezvous = {"store": torch.distributed.HashStore()}
        else:
            rendezvous = {"init_method": f"tcp://{env.master_addr}:{env.master_port}"}
        torch.distributed.init_process_group(
            backend=backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=parallel.distributed_timeout_minutes),
            **rendezvous,
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,
    )
    # As Megatron-LM's initialize does; megatron-core would otherwise create it implicitly
    # (with a warning) on first use. Disabled: no re-running of suspicious steps.
    destroy_rerun_state_machine()  # a process may re-initialise with another layout
    initialize_rerun_state_machine(mode=RerunMode.DISABLED)
    # Megatron-LM's offset: pipeline stages initialise their layers from streams of their own.
    seed += 100 * parallel_state.get_pipeline_model_parallel_rank()
    seed_everything(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return env


@contextlib.contextmanager
def world_of_one(parallel: ParallelConfig, seed: int, command: str) -> Iterator[DistEnv]:
    """A one-process command (`megamod convert`, `upcycle`, `inspect --routing`,
    `generate`) as a world of one, for megatron-core's parallel state and
    dist_checkpointing. Started by torchrun, it uses torchrun's rendezvous; otherwise an
    in-memory one (`init_distributed`), never a MASTER_PORT inherited from a training job's
    environment. Under a launcher with more processes it is refused."""
    if dist_env_from(os.environ).world_size != 1:
        raise MegamodError(f"megamod {command} runs as one process: start it without torchrun or srun")
    if "RANK" not in os.environ:  # not torchrun's
        os.environ.pop("MASTER_PORT", None)
    env = init_distributed(parallel, seed)
    try:
        yield env
    finally:
        destroy_distributed()


def check_device_support(config: Config) -> None:
    """Refuse, naming the key, what this machine's devices cannot run."""
    on_gpu = torch.cuda.is_available()
    # bf16 and fp16 run everywhere (torch computes both on CPU; megamod.cpu_compat lets
    # megatron-core's mixed-precision optimizer take CPU tensors); fp8 needs TE and Hopper.
    check_fp8_supported(config.precision)
    if config.parallel.sequence_parallel and on_gpu:
        from megamod.models.specs import transformer_engine_available

        if not transformer_engine_available():
            # Without TE the local spec's torch norms refuse sequence parallelism on GPU
            # (megamod.cpu_compat lifts that on CPU only).
            raise ConfigError(
                "parallel.sequence_parallel=true on GPU needs transformer-engine: "
                'pip install -e ".[gpu]", or set parallel.sequence_parallel=false'
            )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def collective_device() -> torch.device:
    """Where tensors for collectives live: this rank's GPU under NCCL, else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def is_rank_zero() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
