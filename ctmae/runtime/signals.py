"""Stop signals as a cluster and a terminal send them: to the whole process group, data-loader workers included.

SLURM (time limit, preemption), ``timeout`` and a terminal's Ctrl-C signal every process of the job. The training
process turns SIGTERM/SIGUSR1 and a first Ctrl-C into a flag: the loop finishes its step, writes a checkpoint and
returns. Data-loader workers ignore those signals (they would otherwise die first and take the run down with a
"DataLoader worker is killed by signal" error); they end with their loader, or when their parent is gone.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SIGUSR1: SLURM's warning before the time limit
WORKER_IGNORED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_ACTIVE: list[StopFlag] = []  # flags of the runs in progress in this process, innermost last


class StopFlag:
    """Set by SIGTERM/SIGUSR1 or a first Ctrl-C; a second Ctrl-C aborts at once. Restores handlers on exit (after a
    Ctrl-C, SIGINT is ignored from then on: the run has stopped and only the exit is left).

    ``signal`` names the first stop signal received (``"SIGTERM"``, ``"SIGUSR1"``, ``"SIGINT"``) or is None;
    ``on_ctrl_c`` is what a first Ctrl-C is told the command does before it exits.
    """

    def __init__(self, on_ctrl_c: str = "finishing this step and saving a checkpoint") -> None:
        self.signal: str | None = None
        self.on_ctrl_c = on_ctrl_c
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (*STOP_SIGNALS, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        _ACTIVE.append(self)
        return self

    @property
    def interrupted(self) -> bool:
        """Whether the stop came from Ctrl-C (the command then exits with 130, after the checkpoint)."""
        return self.signal == "SIGINT"

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            if self.signal == "SIGINT":  # the second Ctrl-C: abort now, the last checkpoint stays as it was
                # os._exit, not KeyboardInterrupt: raised inside torch.save's writer, an exception comes back as a
                # write error; every file is written atomically, so stopping anywhere leaves only finished files
                sys.stderr.write("interrupted: a second Ctrl-C; the last saved checkpoint is kept\n")
                sys.stderr.flush()
                os._exit(130)
            # said at once, not after the step: the user is waiting at the terminal
            sys.stderr.write(f"Ctrl-C: {self.on_ctrl_c} (Ctrl-C again aborts)\n")
        self.signal = self.signal or signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.remove(self)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.interrupted:  # the checkpoint is saved and the command is on its way out with 130: a second Ctrl-C
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # landing now would only turn that into Click's "Aborted!"


def pending_stop() -> str | None:
    """The stop signal that reached a run in progress in this process (``"SIGTERM"``...), or None: for code deep
    inside a run (a data loader waiting for a batch) that holds no reference to the run's flag."""
    return next((flag.signal for flag in reversed(_ACTIVE) if flag.signal), None)


class Stopped(Exception):
    """Raised between units of work (sliding windows, scans, cases) that a stop signal ended; ``signal`` names it
    and ``kept`` says what stays for the next run (the command's "stopped early" line)."""

    def __init__(self, signal: str, kept: str = "") -> None:
        super().__init__(f"stop signal ({signal})" + (f"; {kept}" if kept else ""))
        self.signal, self.kept = signal, kept


def check_stop() -> None:
    """Raise ``Stopped`` when a stop signal has reached a run in progress in this process (``pending_stop``)."""
    name = pending_stop()
    if name:
        raise Stopped(name)
