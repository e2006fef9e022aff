"""Stop at a step boundary when the job is asked to end, so it can checkpoint and resume.

Slurm sends SIGUSR1 to every task `--signal=USR1@T` seconds before the time limit (and at
preemption where the cluster sets `PreemptParameters=send_user_signal`); SIGTERM arrives
on preemption with a grace time or on `scancel`; Ctrl-C (SIGINT) in a terminal is taken
the same way once (twice aborts: `megamod` exits 130, the shell's code for Ctrl-C).
`megamod run` (`megamod.cli.run`) relays the three to every worker and exits with the
workers' code (plain torchrun dies of SIGUSR1, kills its workers 30 s after a SIGTERM,
and exits 1). The handler only sets a flag. After each step the loop asks
`should_stop()`, a one-element all-reduce (MAX) of the flag over all ranks: the signal
reaches ranks at different moments, and this way every rank stops after the same step.
The loop then saves a checkpoint and the process exits with `EXIT_RESUMABLE`;
`slurm/train.sbatch` turns that exit code into `scontrol requeue`, and the requeued job
resumes from the checkpoint (`checkpoint.auto_resume`).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType

import torch

from megamod.parallel import collective_device

# sysexits.h's EX_TEMPFAIL ("try again later"): stopped early with a checkpoint saved;
# running the same command again continues the run.
EXIT_RESUMABLE = 75


class AbortedByCtrlC(KeyboardInterrupt):
    """A second Ctrl-C: the job ends at once, without a checkpoint. On its way out of the
    save_dir's lock (`checkpoint.save_dir_locked`) it learns the latest checkpoint there,
    which the same command resumes from; its text is the one line `megamod` prints."""

    def __init__(self) -> None:
        super().__init__()
        self.last_checkpoint: Path | None = None

    def __str__(self) -> str:
        if self.last_checkpoint is None:
            return "aborted by a second Ctrl-C, without saving a checkpoint"
        return (f"aborted by a second Ctrl-C: the steps since the last checkpoint, "
                f"{self.last_checkpoint}, were not saved; the same command resumes from it")


class PreemptionWatcher:
    """From its creation on, SIGUSR1, SIGTERM and a first Ctrl-C (SIGINT) only record that
    they came; a second Ctrl-C aborts at once (AbortedByCtrlC), without a checkpoint."""

    def __init__(self) -> None:
        self.received: str | None = None  # the signal's name, once one came
        self._ctrl_c = False
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            if self._ctrl_c:
                raise AbortedByCtrlC
            self._ctrl_c = True
            print("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to abort "
                  "now, without one)", file=sys.stderr, flush=True)
        self.received = signal.Signals(signum).name

    def should_stop(self) -> bool:
        """Whether any rank has been signalled. Collective: every rank calls it each step."""
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=collective_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag.item() > 0
