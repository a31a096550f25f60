"""Data loaders for the training loops and cache builds: workers that leave stop signals to the training process
and are shut down when their loop ends."""

from __future__ import annotations

import signal
from collections.abc import Iterator

from torch.utils.data import DataLoader

from ctmae.runtime.signals import WORKER_IGNORED


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: leave stop signals to the training process, then let them through."""
    for sig in WORKER_IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORED)


def iterate_workers(loader: DataLoader) -> Iterator:
    """Iterate ``loader`` with workers that ignore stop signals; its workers are shut down when this ends.

    Signals are blocked while the workers are forked, so one sent to the process group in that instant neither
    kills a worker before it has set its handlers nor gets lost in the parent (it is delivered on unblocking).
    """
    if loader.num_workers == 0:
        yield from loader
        return
    loader.worker_init_fn = _ignore_stop_signals
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED)
    try:
        it = iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    try:
        yield from it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
