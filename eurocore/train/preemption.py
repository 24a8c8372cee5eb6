"""Preemption: a signal becomes a checkpoint at the next step boundary on every rank.

SLURM sends SIGTERM when a job is preempted or reaches its time limit (then SIGKILL after
KillWait, 30 s by default), and a chosen signal some time before the limit with
``#SBATCH --signal=USR1@120``. A signal reaches the ranks at different moments, or only
some of them, so a rank that stopped on its own would leave the others waiting in a
collective: at each step boundary the ranks agree (a max over a gloo group of their
"received" flags), and all of them save and exit together.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

# The exit status of a run that saved a checkpoint because it was asked to stop: a batch
# script requeues on it (scripts/slurm/).
PREEMPTED_EXIT_STATUS = 3
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):  # noqa: N818 (a planned stop, not an error)
    """Raised by the training loop at the step boundary after a stop signal: once the
    checkpoint of ``step`` is complete, or with ``saved`` False when the run saves none
    (``why`` says why)."""

    def __init__(self, step: int, signal_name: str, saved: bool = True, why: str = "") -> None:
        outcome = (f"the checkpoint of step {step} is complete" if saved else
                   f"nothing saved ({why})")
        super().__init__(f"stopped by {signal_name} after step {step - 1}; {outcome}")
        self.step, self.signal_name, self.saved = step, signal_name, saved


class StopSignals:
    """Catches SIGTERM and SIGUSR1 (from :meth:`install` until :meth:`uninstall`), and
    tells every rank alike whether any rank received one (:meth:`agreed`).

    Collective: every rank makes one, in the same order (it makes a gloo group, so that the
    agreement costs the GPUs no synchronisation and works beside NCCL).
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignals:
        """Handles the signals from now on (the main thread only, as Python requires)."""
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self, failed: bool = False) -> tuple[str | None, bool]:
        """(the name of a signal some rank received, or None; whether some rank passed
        ``failed``: a failure of its own that every rank must stop for, such as a background
        save that failed), the same on every rank: one all-reduce over the gloo group."""
        if self.group is None:
            return self.received, failed
        flags = torch.tensor([0 if self.received is None else
                              1 + SIGNALS.index(signal.Signals[self.received]), int(failed)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        code = int(flags[0])
        return (None if code == 0 else SIGNALS[code - 1].name), bool(flags[1])
