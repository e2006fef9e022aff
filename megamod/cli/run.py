"""`megamod run [torchrun options] train CONFIG.yaml [key.sub=value ...]`: torchrun for a
megamod training job.

torchrun's own launcher (`torch.distributed.run`: the same options, rendezvous, worker
environment and `kill -9` behaviour), with three differences:
- SIGTERM, SIGUSR1 and Ctrl-C (SIGINT) sent to the launcher are relayed to every worker,
  where `megamod.training.preemption` stops them all after the same step with a
  checkpoint, and the launcher waits for them however long the save takes. (torchrun
  kills its workers `--shutdown-timeout` seconds after a SIGTERM, dies of a SIGUSR1 without
  relaying it, and exits 1.) A second Ctrl-C aborts the workers and the launcher at once.
- Its exit code is the job's: 0; 75 when the workers stopped early with a checkpoint saved
  (the same command continues the run); 2 when a worker refused the config or an input
  (its message is above, on the worker's stderr); 1 for anything else.
- Before any worker starts, the config is loaded and its layout checked for the job's
  world size (nodes x processes per node), as `megamod train --dry-run --world-size N` does:
  a refusal is one message and exit 2, not one traceback per worker.
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType
from typing import Callable, Iterable

import psutil

from megamod.training.preemption import EXIT_RESUMABLE

USAGE = "usage: megamod run [torchrun options] train CONFIG.yaml [key.sub=value ...]"

EXIT_BAD_INPUT = 2  # megamod.__main__'s code for a refused config or input
# Taken by the workers (megamod.training.preemption); the launcher relays them.
RELAYED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# torchrun's other default stop signals: its agent stops the workers at once, as torchrun.
AGENT_SIGNALS = ("SIGHUP", "SIGQUIT")


class SignalRelay:
    """From its creation on, SIGTERM, SIGUSR1 and SIGINT to this process go to each process
    `workers()` lists (by default this process's children: torchrun's agent starts nothing
    else, they are the workers). A second SIGINT also aborts this process
    (KeyboardInterrupt). A signal that finds no worker (before they start) ends this process
    as it would have without the relay."""

    def __init__(self, workers: Callable[[], list[psutil.Process]] | None = None) -> None:
        self._workers = workers or (lambda: psutil.Process().children())
        self._interrupted = False
        for sig in RELAYED_SIGNALS:
            signal.signal(sig, self._relay)

    def _relay(self, signum: int, frame: FrameType | None) -> None:
        workers = self._workers()
        if not workers:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        for worker in workers:
            try:
                worker.send_signal(signum)
            except psutil.NoSuchProcess:
                pass  # it ended meanwhile
        if signum == signal.SIGINT:
            if self._interrupted:
                raise KeyboardInterrupt
            self._interrupted = True


def job_exit_code(failed_workers: Iterable[int]) -> int:
    """The job's exit code from the exit codes of its failed workers (torchrun's agent
    reports them once one has failed, after stopping the others with SIGTERM): a refusal
    (2) wins, since the others' failures follow from it; then 75 when any worker stopped
    early, since a rank exits 75 only after the collective save's last barrier, when the
    checkpoint is complete (the others may be stopped as they exit: Python restores the
    default SIGTERM action while it shuts down); 1 otherwise."""
    codes = set(failed_workers)
    if EXIT_BAD_INPUT in codes:
        return EXIT_BAD_INPUT
    return EXIT_RESUMABLE if EXIT_RESUMABLE in codes else 1


def _ended(exit_code: int) -> str:
    # subprocess's convention: -N for a process killed by signal N.
    return f"killed by {signal.Signals(-exit_code).name}" if exit_code < 0 else f"exited {exit_code}"


def argument_parser() -> argparse.ArgumentParser:
    """torchrun's parser, with this command's usage."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = "megamod run"
    parser.usage = USAGE[len("usage: "):]
    parser.description = (
        "Launch `megamod train` on every process of a job, as torchrun does (any torchrun "
        "option before `train`); SIGTERM, SIGUSR1 and Ctrl-C stop the job after a step with "
        "a checkpoint (exit 75: the same command continues it)."
    )
    for action in parser._actions:  # torchrun's positionals name a script
        if action.dest == "training_script":
            action.metavar, action.help = "train", "the command (megamod train)"
        elif action.dest == "training_script_args":
            action.metavar, action.help = "CONFIG.yaml key.sub=value", "the config and overrides"
    return parser


def check_job(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before any worker starts, what the workers would: the command line, the
    config, and its layout over the job's processes when their number is fixed."""
    from torch.distributed.run import determine_local_world_size, parse_min_max_nnodes

    from megamod.config import load_config
    from megamod.parallel import parallel_layout
    from megamod.training.logging import silence_upstream_warnings

    silence_upstream_warnings()
    from megamod.training.loop import check_batch_split

    if args.training_script != "train" or not args.training_script_args:
        parser.error("give the command as train CONFIG.yaml [key.sub=value ...], after the "
                     "torchrun options")
    path, *overrides = args.training_script_args
    options = [a for a in args.training_script_args if a.startswith("-")]
    if options:
        parser.error(f"{' '.join(options)}: megamod run takes train CONFIG.yaml and "
                     "key.sub=value overrides; torchrun options go before `train` (a dry "
                     "run is one process: megamod train CONFIG.yaml --dry-run --world-size N)")
    if args.no_python or args.run_path:
        parser.error("--no-python and --run-path do not apply: megamod run runs megamod")
    if args.max_restarts:
        parser.error("--max-restarts: megamod run restarts nothing; run the same command "
                     "again and it resumes from the last checkpoint (checkpoint.auto_resume)")
    if not hasattr(args, "signals_to_handle"):
        parser.error("megamod run needs torch >= 2.9 (the launcher's --signals-to-handle); "
                     "with this torch use torchrun, where a stop signal ends the job "
                     "without exit 75")
    config = load_config(path, overrides)
    min_nodes, max_nodes = parse_min_max_nnodes(args.nnodes)
    if min_nodes == max_nodes:  # else the world size is known only at the rendezvous
        world_size = min_nodes * determine_local_world_size(args.nproc_per_node)
        check_batch_split(config, parallel_layout(config.parallel, world_size).dp)


def main(argv: list[str]) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    parser = argument_parser()
    args = parser.parse_args(argv)
    check_job(parser, args)
    args.module = True
    args.training_script_args = [args.training_script, *args.training_script_args]
    args.training_script = "megamod"
    handled = {s.strip() for s in args.signals_to_handle.split(",")} | set(AGENT_SIGNALS)
    args.signals_to_handle = ",".join(sorted(handled - {s.name for s in RELAYED_SIGNALS}))

    SignalRelay()
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        code = job_exit_code(f.exitcode for f in e.failures.values())
        if code != EXIT_RESUMABLE:
            failed = ", ".join(f"rank {rank} {_ended(f.exitcode)}"
                               for rank, f in sorted(e.failures.items()))
            print(f"megamod run: {failed} (their messages are above)", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("megamod run: aborted by a second Ctrl-C, without a checkpoint", file=sys.stderr)
        return 130
    return 0
