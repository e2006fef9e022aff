"""`python -m megamod <command>` and the `megamod` console script.

Commands: `train CONFIG.yaml [key.sub=value ...]`, `run [torchrun options] train ...`,
`build-shards ...`, `upcycle ...`, `inspect ...`, `convert ...`, `generate ...`, `eval ...`.
Exit codes: 0 success, 2 bad config or input (the message names the key or file),
75 (train, run) stopped early by a signal with a checkpoint saved: run it again to continue,
130 aborted by Ctrl-C (train: a second one), 1 anything else (a bug: the traceback is printed).
"""

from __future__ import annotations

import importlib
import sys

from megamod.errors import MegamodError

EXIT_INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)

USAGE = """usage: megamod <command> [args]

commands:
  train CONFIG.yaml [key.sub=value ...]   train: one process, or each of `run`'s or srun's
        [--dry-run [--world-size N] [--gpu-memory GIB] [--json]]
                                          check a run and estimate its memory per GPU
  run [torchrun options] train CONFIG.yaml [key.sub=value ...]
                                          train on several processes, as torchrun; stop
                                          signals reach the workers (see --help)
  build-shards --format {llava,mimicit} ...  build WebDataset shards (see --help)
  upcycle --input CKPT --output CKPT --num-experts N --layer-freq K
                                          turn a dense checkpoint into a MoE one (see --help)
  inspect CKPT_DIR [--routing --data SHARDS]  describe a checkpoint (see --help)
  convert --from {hf,hf-parts,megamod} --to {megamod,hf} ...
                                          convert checkpoints (see --help)
  generate --checkpoint CKPT_DIR --image FILE --prompt TEXT [--max-new-tokens N]
           [--temperature T]              answer a prompt about an image (see --help)
  eval --checkpoint CKPT_DIR --task TASK --questions FILE [--images DIR]
       [--annotations FILE|DIR] [--submission-questions FILE] [--output answers.jsonl]
       [--force] [--max-new-tokens N] [--batch-size B] [--json]
                                          answer and score a benchmark, under torchrun for
                                          several processes (see --help)
"""


# Each command's module is imported when it runs: `megamod build-shards` never pays for
# megatron-core's import.
COMMANDS = {
    "train": "train",
    "run": "run",
    "build-shards": "build_shards",
    "upcycle": "upcycle",
    "inspect": "inspect",
    "convert": "convert",
    "generate": "generate",
    "eval": "eval",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return 2 if argv and argv[0] not in ("-h", "--help") else 0
    try:
        command = importlib.import_module(f"megamod.cli.{COMMANDS[argv[0]]}")
        return command.main(argv[1:])
    except MegamodError as e:
        from megamod.cli import rank_prefix

        print(f"{rank_prefix()}error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # The user's choice, not a bug: one line, no traceback. A second Ctrl-C in training
        # (megamod.training.preemption.AbortedByCtrlC) says what it left unsaved.
        from megamod.cli import rank_prefix

        print(f"{rank_prefix()}{str(e) or 'aborted by Ctrl-C'}", file=sys.stderr)
        return EXIT_INTERRUPTED


# The guard matters: dist_checkpointing's writer starts processes that re-import main.
if __name__ == "__main__":
    sys.exit(main())
