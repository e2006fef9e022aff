"""Helper processes die with the process that started them, however it dies.

megatron-core's dist_checkpointing writer (`FileSystemWriterAsync`, behind every
`dist_checkpointing.save`, synchronous ones included) starts two kinds of processes:
- at the first save, a `multiprocessing` Manager serving its results queue, a spawned
  Python process (`filesystem_async._get_write_results_queue`); spawning also starts
  multiprocessing's resource tracker. megamod's Manager does not run the main module
  again, as spawn would (a training script's imports: seconds and ~250 MB a rank);
- at each save, forked writer processes, which inherit every open file, the save_dir lock
  (`megamod.training.checkpoint.SaveDirLock`) included.
A rank killed with `kill -9` (or with its launcher) runs no exit handler: the Manager would
live on under PID 1, the tracker with it (it waits for every holder of its pipe to close
it), and a writer would write on holding the lock, so the next job on the save_dir would be
refused. `helpers_die_with_us` has the kernel kill the writers with the process that
started them, and the Manager watch for its parent's death (`exit_with_parent`); the tracker
then reads end-of-file and exits too.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import multiprocessing.util
import os
import signal
import sys
import threading
import time
from multiprocessing.managers import SyncManager
from queue import Queue
from typing import Iterator

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; elsewhere nothing).
    `parent_pid`: the parent as the parent itself or this process saw it at start-up.

    The kernel's "parent" is the thread that started this process: start helpers from a
    thread that lives as long as they should (here, the main thread)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # The parent may have died before the prctl: then nothing would ever signal us.
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def helpers_die_with_us() -> None:
    """From now on, the checkpoint writer's Manager (started at the first save, as
    megatron-core does) and every process this one forks through `multiprocessing` die with
    it. Idempotent; starts nothing by itself."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._get_write_results_queue is _results_queue:
        return
    # The writer looks the function up in its module at each save.
    filesystem_async._get_write_results_queue = _results_queue
    multiprocessing.util.register_after_fork(_AFTER_FORK, _die_with_parent_process)


def exit_with_parent(parent_pid: int) -> None:
    """A daemon thread that ends this process once `parent_pid` is no longer its parent.
    For the Manager, which lives for the whole run: the kernel's parent-death signal
    follows the *thread* that started a process, and the first save, which starts the
    Manager, may run in a thread that ends long before the run does."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="megamod-exit-with-parent", daemon=True).start()


@contextlib.contextmanager
def _main_module_not_rerun() -> Iterator[None]:
    """multiprocessing's spawn runs the parent's main module again in the child (so that
    objects defined there unpickle); while this holds, it does not. The Manager needs nothing
    from it, and a script that trains imports megatron-core: seconds of CPU and ~250 MB
    for each rank's Manager otherwise."""
    main = sys.modules["__main__"]
    saved = {key: main.__dict__[key] for key in ("__spec__", "__file__") if key in main.__dict__}
    main.__spec__ = None  # spawn looks at the spec's name, then at __file__
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.update(saved)


def _results_queue() -> Queue:
    """megatron-core's `_get_write_results_queue`, with a Manager that dies with us (and
    does not run our main module again)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        with _main_module_not_rerun():
            manager.start(initializer=exit_with_parent, initargs=(os.getpid(),))
        # The queue's proxy keeps the manager (and its shutdown at exit) alive.
        filesystem_async._results_queue = manager.Queue()
    return filesystem_async._results_queue


def _die_with_parent_process(_: object) -> None:
    # Runs in each child multiprocessing forks, before its target.
    die_with_parent(multiprocessing.parent_process().pid)


class _AfterFork:
    """The key of the after-fork hook, which multiprocessing holds weakly."""


_AFTER_FORK = _AfterFork()
