"""`python -m megamod <command>` and the `megamod` console script.

Commands: `train CONFIG.yaml [key.sub=value ...]`, `build-shards ...`, `upcycle ...`,
`inspect ...`, `convert ...`, `generate ...`.
Exit codes: 0 success, 2 bad config or input (the message names the key or file),
75 (train) stopped early by a signal with a checkpoint saved: run it again to continue,
1 anything else (a bug: the traceback is printed).
"""

from __future__ import annotations

import sys

from megamod.errors import MegamodError

USAGE = """usage: megamod <command> [args]

commands:
  train CONFIG.yaml [key.sub=value ...]   train (under torchrun or srun for several processes)
  build-shards --format {llava,mimicit} ...  build WebDataset shards (see --help)
  upcycle --input CKPT --output CKPT --num-experts N --layer-freq K
                                          turn a dense checkpoint into a MoE one (see --help)
  inspect CKPT_DIR [--routing --data SHARDS]  describe a checkpoint (see --help)
  convert --from {hf,hf-parts,megamod} --to {megamod,hf} ...
                                          convert checkpoints (see --help)
  generate --checkpoint CKPT_DIR --image FILE --prompt TEXT [--max-new-tokens N]
           [--temperature T]              answer a prompt about an image (see --help)
"""


def train_command(argv: list[str]) -> int:
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
        print(f"{_rank_prefix()}training failed:", file=sys.stderr, flush=True)
        raise
    finally:
        destroy_distributed()
    return EXIT_RESUMABLE if result.stopped_early else 0


def build_shards_command(argv: list[str]) -> int:
    from megamod.data.shards import main

    return main(argv)


def upcycle_command(argv: list[str]) -> int:
    from megamod.moe.upcycle import main

    return main(argv)


def inspect_command(argv: list[str]) -> int:
    from megamod.inspector import main

    return main(argv)


def convert_command(argv: list[str]) -> int:
    from megamod.convert import main

    return main(argv)


def generate_command(argv: list[str]) -> int:
    from megamod.training.logging import silence_upstream_warnings

    silence_upstream_warnings()
    from megamod.inference.generate import main

    return main(argv)


COMMANDS = {
    "train": train_command,
    "build-shards": build_shards_command,
    "upcycle": upcycle_command,
    "inspect": inspect_command,
    "convert": convert_command,
    "generate": generate_command,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return 2 if argv and argv[0] not in ("-h", "--help") else 0
    try:
        return COMMANDS[argv[0]](argv[1:])
    except MegamodError as e:
        rank = _rank_prefix()
        print(f"{rank}error: {e}", file=sys.stderr)
        return 2


def _rank_prefix() -> str:
    import os

    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID")
    return f"[rank {rank}] " if rank is not None else ""


# The guard matters: dist_checkpointing's writer starts processes that re-import main.
if __name__ == "__main__":
    sys.exit(main())
