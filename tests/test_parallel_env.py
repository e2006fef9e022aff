"""Where a process sits in the job, read from torchrun's or Slurm's environment."""

from __future__ import annotations

import contextlib
import socket

import pytest

from megamod.parallel import cuda_device_index, dist_env_from, first_slurm_host


@pytest.mark.parametrize(
    "nodelist, host",
    [("node1", "node1"), ("gpu[003-005,007]", "gpu003"), ("gpu[12,15]", "gpu12"),
     ("a1,b2", "a1"), ("h100-[0001-0004]", "h100-0001")],
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_torchrun_env_wins():
    env = dist_env_from({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                         "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234", "SLURM_PROCID": "0",
                         "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (
        3, 8, 1, "10.0.0.1", 1234)


def test_slurm_env():
    env = dist_env_from({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                         "SLURM_NODELIST": "gpu[010-013]", "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 16, 1, "gpu010")
    assert env.master_port == 20000 + 123456 % 20000


def test_single_process_default():
    env = dist_env_from({})
    assert (env.rank, env.world_size, env.local_rank) == (0, 1, 0)
    assert dist_env_from({"MASTER_PORT": "4321"}).master_port == 4321


def test_single_process_picks_a_free_port_not_torchruns_default():
    """Two one-process runs on one machine (or one beside a test) must not collide."""
    with contextlib.ExitStack() as stack:
        try:  # hold torchrun's default port, unless someone else already does
            busy = stack.enter_context(socket.socket())
            busy.bind(("127.0.0.1", 29500))
            busy.listen()
        except OSError:
            pass
        port = dist_env_from({}).master_port
        assert port != 29500
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


@pytest.mark.parametrize(
    "local_rank, visible, index",
    [(0, 8, 0), (5, 8, 5),  # torchrun or plain srun: every rank sees the node's 8 GPUs
     (5, 1, 0), (7, 1, 0),  # srun --gpus-per-task=1: each task sees its own GPU as cuda:0
     (3, 2, 1)],            # --gpus-per-task=2: one of the task's own two
)
def test_cuda_device_index_stays_among_the_visible_gpus(local_rank, visible, index):
    assert cuda_device_index(local_rank, visible) == index


def test_cuda_device_index_without_a_visible_gpu_says_so():
    with pytest.raises(ValueError, match="no visible CUDA device for local rank 2"):
        cuda_device_index(2, 0)
