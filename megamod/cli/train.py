"""`megamod train CONFIG.yaml [key.sub=value ...]`: one training job, on every rank.

The same command runs as one process, under `torchrun` and under `srun`. With
`--dry-run [--world-size N] [--gpu-memory GIB] [--json]` it checks the job for N GPUs and
estimates its memory per GPU instead (`megamod.training.plan`), as one process, without a
GPU, and exits 2 naming what to change when the estimate exceeds GIB (default 80).

`eval.tasks` (benchmarks during training, `megamod.eval.during_training`) is built here,
above the training layer: their files are read and checked before any process group
exists, and the loop's Validator calls it with the training model at each evaluation.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from megamod.cli import rank_prefix
from megamod.errors import ConfigError, MegamodError

if TYPE_CHECKING:
    from megamod.config import Config
    from megamod.eval.during_training import BenchmarkTasks

USAGE = ("usage: megamod train CONFIG.yaml [key.sub=value ...] "
         "[--dry-run [--world-size N] [--gpu-memory GIB] [--json]]")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megamod train CONFIG.yaml", usage=USAGE[7:],
        description="Train the model a YAML config describes; any key can be overridden as "
        "section.key=value (YAML values). Sections: " + ", ".join(_sections())
        + ". megamod/config.py holds every key with its default and meaning.",
    )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the job and estimate its memory per GPU; train nothing")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="with --dry-run: the GPUs (processes) the job will have (default 1)")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                        help="with --dry-run: memory of one GPU in GiB (default 80)")
    parser.add_argument("--json", action="store_true",
                        help="with --dry-run: one JSON object instead of the table")
    return parser


def _sections() -> list[str]:
    import dataclasses

    from megamod.config import Config

    return [f.name for f in dataclasses.fields(Config)]


def main(argv: list[str]) -> int:
    """0 when train.train_iters is reached; EXIT_RESUMABLE (75) when a stop signal (Slurm's
    SIGUSR1, SIGTERM) ended it early with a checkpoint saved: run it again to continue.
    With --dry-run: 0 when the job checks out and fits, 2 when not."""
    import os

    launcher_pid = os.getppid()  # first thing: see die_with_launcher
    parser = _parser()
    if argv and argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if not argv or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    args = parser.parse_intermixed_args(argv[1:])
    if not args.dry_run and (args.world_size, args.gpu_memory, args.json) != (None, None, False):
        parser.error("--world-size, --gpu-memory and --json go with --dry-run")
    if args.dry_run:
        return dry_run(parser, argv[0], args)
    from megamod.config import load_config

    config = load_config(argv[0], args.overrides)  # fails before any process group exists
    make_output_dirs(config)
    with tempfile.TemporaryDirectory(prefix="megamod-eval-") as scratch:  # MMBench's images
        benchmarks = benchmarks_of(config, Path(scratch))
        return _train(config, launcher_pid, benchmarks)


def benchmarks_of(config: Config, scratch: Path) -> Optional[BenchmarkTasks]:
    """`eval.tasks` read and checked (MMBench's images decoded into `scratch`), or None."""
    if not config.eval.tasks:
        return None
    from megamod.eval.during_training import BenchmarkTasks

    return BenchmarkTasks(config, scratch)


def _train(config: Config, launcher_pid: int, benchmarks: Optional[BenchmarkTasks]) -> int:
    """The job on this rank, from signal handling to the process group's end."""
    from megamod.training.preemption import EXIT_RESUMABLE, PreemptionWatcher

    # Before the slow imports and set-up, so a signal then still ends in a checkpoint.
    # Without a save_dir there is nothing to resume: signals keep their default action.
    preemption = PreemptionWatcher() if config.checkpoint.save_dir else None
    from megamod.training.logging import setup_console_logging, silence_upstream_warnings

    silence_upstream_warnings()
    from megamod.parallel import destroy_distributed, die_with_launcher, init_distributed
    from megamod.training.loop import train

    die_with_launcher(launcher_pid)
    init_distributed(config.parallel, config.train.seed)
    setup_console_logging()
    try:
        result = train(config, preemption, benchmarks)
    except MegamodError:
        raise  # main() prints it with the rank
    except Exception:
        # Every rank's traceback lands in one job log: say whose this one is.
        print(f"{rank_prefix()}training failed:", file=sys.stderr, flush=True)
        raise
    finally:
        destroy_distributed()
    return EXIT_RESUMABLE if result.stopped_early else 0


def make_output_dirs(config: Config) -> None:
    """Create `checkpoint.save_dir` and `logging.tensorboard_dir` (as the run would, at
    its first save or log) and check that files can be written there: a path under a
    file, under /proc or in a read-only folder is refused now, naming the key, instead of
    after the process group and the model are set up. Every rank checks, so all of
    them exit alike."""
    import tempfile

    for key, path in (("checkpoint.save_dir", config.checkpoint.save_dir),
                      ("logging.tensorboard_dir", config.logging.tensorboard_dir)):
        if path is None:
            continue
        step = "cannot be created"
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
            step = "is a folder no file can be written to"
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as e:
            raise ConfigError(
                f"{key}={path} {step} ({e.strerror}): set {key} to a folder this job can "
                f"create and write"
            ) from None


def dry_run(parser: argparse.ArgumentParser, path: str, args: argparse.Namespace) -> int:
    """`--dry-run`: the plan on stdout; a refusal (a check failed, or the estimate exceeds
    --gpu-memory) raises MegamodError, which `megamod.__main__` turns into exit 2. Never
    starts a process group of N ranks, never touches checkpoint.save_dir or a GPU."""
    import json
    import os

    world_size = 1 if args.world_size is None else args.world_size
    gpu_memory = 80.0 if args.gpu_memory is None else args.gpu_memory
    if world_size < 1 or not gpu_memory > 0:
        parser.error("--world-size must be >= 1 and --gpu-memory > 0")
    if "torch" not in sys.modules:
        # The model is built on the meta device through megatron-core's CPU path; a GPU
        # here would only draw CUDA allocations into it.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from megamod.config import load_config

    config = load_config(path, args.overrides)
    with tempfile.TemporaryDirectory(prefix="megamod-eval-") as scratch:
        benchmarks_of(config, Path(scratch))  # eval.tasks' files, as the run reads them
    from megamod.training.logging import silence_upstream_warnings

    silence_upstream_warnings()
    from megamod.training.plan import check_fits, dry_run as plan_run, format_plan, plan_json

    plan = plan_run(config, world_size, gpu_memory)
    if args.json:
        print(json.dumps(plan_json(plan)))
    else:
        print(f"megamod train {path} --dry-run --world-size {world_size}\n{format_plan(plan)}")
    check_fits(plan)
    return 0
