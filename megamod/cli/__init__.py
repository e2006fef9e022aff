"""The `megamod` commands, one module each: argument parsing, one-process worlds, output
staging, progress and exit codes, on top of the library. Nothing outside `megamod.cli`
(and `megamod.__main__`, which dispatches to it) imports it.
"""

from __future__ import annotations

import os


def rank_prefix() -> str:
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID")
    return f"[rank {rank}] " if rank is not None else ""
