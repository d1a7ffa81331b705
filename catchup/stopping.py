"""Stopping on a signal: SIGTERM (what job schedulers send before they kill a job) and SIGUSR1 (what a SLURM
script asks for with `#SBATCH --signal=USR1@180`) make the run write a checkpoint at the next step boundary and
exit with STOPPED_EXIT_CODE, so that a requeued job continues with `--resume`.

CATCHUP_STOP_SIGNALS (e.g. `SIGTERM,SIGUSR2`) replaces the set of signals.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Any

from catchup.errors import CatchupError

ENV = "CATCHUP_STOP_SIGNALS"
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")
STOPPED_EXIT_CODE = 75      # EX_TEMPFAIL: not finished, run again


class Stopped(Exception):
    """Raised once the stop checkpoint is written; the scripts print it and exit with STOPPED_EXIT_CODE."""


def stop_signals() -> tuple[signal.Signals, ...]:
    names = [n.strip().upper() for n in os.environ.get(ENV, ",".join(DEFAULT_SIGNALS)).split(",") if n.strip()]
    found = []
    for name in names:
        full = name if name.startswith("SIG") else "SIG" + name
        if not hasattr(signal.Signals, full) or full in ("SIGKILL", "SIGSTOP"):
            raise CatchupError(f"{ENV}: {name!r} is not a signal that can be caught (e.g. SIGTERM,SIGUSR1)")
        found.append(signal.Signals[full])
    return tuple(found)


class StopOnSignal:
    """A context that turns the stop signals into a request checked at step boundaries.

    With several processes each may get the signal at a slightly different moment, so they agree through an
    all-reduce every ``every`` steps (the log steps, where the host waits for the device anyway); a single
    process checks its own flag at every step.
    """

    def __init__(self, accelerator=None, every: int = 1):
        self.signals = stop_signals()
        self.accelerator, self.every = accelerator, every
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> "StopOnSignal":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "StopOnSignal":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum: int, frame) -> None:
        # A repeat is ignored: under SLURM a process may get the signal both from the scheduler and from the
        # launcher passing it on. Ctrl-C (SIGINT) still stops at once, keeping the last complete checkpoint.
        if self.received is not None:
            return
        self.received = signal.Signals(signum)
        print(f"received {self.received.name}: writing a checkpoint at the next step boundary, then stopping",
              file=sys.stderr, flush=True)

    def requested(self, step: int) -> bool:
        if self.accelerator is None or self.accelerator.num_processes == 1:
            return self.received is not None
        if step % self.every:
            return False
        import torch
        flag = torch.tensor(float(self.received is not None), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "sum").item() > 0)

    def message(self, step: int) -> str:
        why = self.received.name if self.received is not None else "a stop signal on another process"
        return f"stopped by {why} at step {step}; the checkpoint is written, continue with --resume"
