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
        raise _in_use(output, holder)
    if output.exists() and not force and (not output.is_dir() or any(output.iterdir())):
        raise CheckpointError(
            f"--output {output} exists and is not empty: choose another path or pass "
            f"--force to replace it"
        )


def _in_use(output: Path, holder: str) -> CheckpointError:
    return CheckpointError(
        f"--output {output} is the checkpoint.save_dir of a running job ({holder}): "
        f"wait for it to end, or write elsewhere"
    )


@contextlib.contextmanager
def staged(output: Path) -> Iterator[Path]:
    """A folder beside `output` to write into; it replaces `output` only when complete,
    and is removed if writing fails. Meanwhile this process holds `output`'s save_dir
    lock, as a training job does: a job started into `output` since `check_output` is
    refused, instead of losing its checkpoints to the replacement."""
    output = output.resolve()  # "." or ".." has no name to stage beside
    staging = output.parent / f".{output.name}.staging"
    with _save_dir_locked(output):
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


@contextlib.contextmanager
def _save_dir_locked(output: Path) -> Iterator[None]:
    """Hold `output`'s save_dir lock inside the block (none for a file: no job trains
    into one). Should the block fail, what taking the lock added (the lock file, the
    folder) goes again: a rerun then finds `output` as the user left it."""
    from megamod.training.checkpoint import LOCK_FILE, SaveDirInUse, SaveDirLock

    if output.exists() and not output.is_dir():
        yield
        return
    lock_file = output / LOCK_FILE
    new_folder, new_lock_file = not output.exists(), not lock_file.exists()
    lock = SaveDirLock(output)
    try:
        lock.acquire()
    except SaveDirInUse as e:
        raise _in_use(output, e.holder) from None
    try:
        yield
    except BaseException:
        if new_lock_file:
            lock_file.unlink(missing_ok=True)  # before the release: no job can hold it yet
        if new_folder:
            with contextlib.suppress(OSError):  # something else is there now: kept
                output.rmdir()
        raise
    finally:
        lock.release()
