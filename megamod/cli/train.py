"""`megamod train CONFIG.yaml [key.sub=value ...]`: one training job, on every rank.

The same command runs as one process, under `torchrun` and under `srun`.
"""

from __future__ import annotations

import sys

from megamod.cli import rank_prefix
from megamod.errors import MegamodError


def main(argv: list[str]) -> int:
    """0 when train.train_iters is reached; EXIT_RESUMABLE (75) when a stop signal (Slurm's
    SIGUSR1, SIGTERM) ended it early with a checkpoint saved: run it again to continue."""
    import os

    launcher_pid = os.getppid()  # first thing: see die_with_launcher
    from megamod.config import load_config

    if not argv or argv[0].startswith("-"):
        print("usage: megamod train CONFIG.yaml [key.sub=value ...]", file=sys.stderr)
        return 2
    config = load_config(argv[0], argv[1:])  # fails before any process group exists

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
        result = train(config, preemption)
    except MegamodError:
        raise  # main() prints it with the rank
    except Exception:
        # Every rank's traceback lands in one job log: say whose this one is.
        print(f"{rank_prefix()}training failed:", file=sys.stderr, flush=True)
        raise
    finally:
        destroy_distributed()
    return EXIT_RESUMABLE if result.stopped_early else 0
