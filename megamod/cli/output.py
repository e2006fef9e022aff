"""Writing a command's output folder: never over an input, never half-written."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from megamod.errors import CheckpointError


def check_output(output: Path, inputs: list[Path], force: bool) -> None:
    """Refuse an `output` that is, holds or lies inside an input (replacing it would
    delete the input), a save_dir a job is training into, and an existing one unless
    `force`."""
    from megamod.training.checkpoint import lock_holder

    out = output.resolve()
    for given in inputs:
        source = given.resolve()
        if out == source or out in source.parents or source in out.parents:
            raise CheckpointError(
                f"--output {output} overlaps the input {given} (replacing it would delete "
                f"the input): write to a folder outside it"
            )
    holder = lock_holder(output)
    if holder is not None:
        raise CheckpointError(
            f"--output {output} is the checkpoint.save_dir of a running job ({holder}): "
            f"wait for it to end, or write elsewhere"
        )
    if output.exists() and not force and (not output.is_dir() or any(output.iterdir())):
        raise CheckpointError(
            f"--output {output} exists and is not empty: choose another path or pass "
            f"--force to replace it"
        )


@contextlib.contextmanager
def staged(output: Path) -> Iterator[Path]:
    """A folder beside `output` to write into; it replaces `output` only when complete,
    and is removed if writing fails."""
    output = output.resolve()  # "." or ".." has no name to stage beside
    staging = output.parent / f".{output.name}.staging"
    if staging.exists():  # left by a killed run
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.is_dir():
        shutil.rmtree(output)
    elif output.exists():
        output.unlink()
    os.replace(staging, output)
