"""Data loaders that cannot hang: workers that leave stop signals to the training process, a bounded wait for each
batch, worker failures as one line, and a check that ``/dev/shm`` can hold the batches in flight.

Docker's and podman's default ``/dev/shm`` is 64 MB. Workers hand batches over in shared memory; when it is full
the worker's hand-over fails in a background thread, the batch is lost, and a loader without a timeout waits for it
forever (a stop signal only sets a flag the waiting loop never reads). So workers are planned against the free
shared memory before they start, and every wait polls: a stop signal ends it, and so does a stall.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

from torch.utils.data import DataLoader

from ctmae.runtime.signals import WORKER_IGNORED, pending_stop

PREFETCH = 2  # items each worker prepares ahead (torch's default)
POLL_S = 1.0  # how often a wait for a batch looks at stop signals and worker health
STALL_S = 45.0  # no batch from any worker for this long: the run ends with one line (a hang is the alternative)
VOLUME_STALL_S = 600.0  # the same for loaders that preprocess a whole scan per item (a large scan takes minutes)
SHM = Path("/dev/shm")
SHM_SHARE = 0.75  # the share of the free shared memory the items in flight may take
SHM_HINT = "give the container more: docker run --shm-size 2g (or --ipc=host)"


class LoaderError(RuntimeError):
    """The data loader failed (a worker died or raised, or delivered nothing for ``STALL_S``): one line."""


class LoaderStopped(Exception):
    """A stop signal came while the training process was waiting for a batch."""


def shm_free(shm: Path = SHM) -> int | None:
    """Free bytes in the shared-memory file system, or None where there is none to check."""
    try:
        st = os.statvfs(shm)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def plan_workers(workers: int, item_bytes: int, shm: Path = SHM) -> tuple[int, str | None]:
    """(workers, a note or None): as many of ``workers`` as the free shared memory holds.

    Each worker has ``PREFETCH`` items of ``item_bytes`` in shared memory, and the training process holds two more
    (the one it uses, the one arriving). They may take ``SHM_SHARE`` of the free space; when they would take more,
    fewer workers start, and with none left the loader reads in the training process. The note says so, with the way
    to give a container more.
    """
    free = shm_free(shm)
    if workers == 0 or free is None:
        return workers, None
    fit = min(workers, max(0, int((free * SHM_SHARE / item_bytes - 2) // PREFETCH)))
    if fit == workers:
        return workers, None
    mb = 1 << 20
    need = (workers * PREFETCH + 2) * item_bytes / SHM_SHARE
    instead = f"{fit} worker(s) instead" if fit else "loading in the training process instead"
    return fit, (
        f"{shm} has {free / mb:.0f} MB free, {workers} data-loader worker(s) would need about {need / mb:.0f} MB: "
        f"{instead}; {SHM_HINT}"
    )


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: leave stop signals to the training process, then let them through."""
    for sig in WORKER_IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORED)


def iterate_workers(loader: DataLoader, stall_s: float | None = None) -> Iterator:
    """Iterate ``loader`` with workers that ignore stop signals; its workers are shut down when this ends.

    Signals are blocked while the workers are forked, so one sent to the process group in that instant neither
    kills a worker before it has set its handlers nor gets lost in the parent (it is delivered on unblocking).
    Each wait for an item polls every ``POLL_S``: a stop signal that reached a run in progress raises
    ``LoaderStopped``; no item for ``stall_s`` seconds (None: no limit, for work of unknown length such as cache
    builds) and a worker that died or raised raise ``LoaderError`` with one line.
    """
    if loader.num_workers == 0:
        yield from loader
        return
    loader.worker_init_fn = _ignore_stop_signals
    loader.timeout = POLL_S
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED)
    try:
        it = iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    try:
        while True:
            item = _next_item(it, stall_s)
            if item is _END:
                return
            yield item
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


_END = object()


def _next_item(it: Iterator, stall_s: float | None) -> object:
    """The loader's next item (``_END`` at its end), waiting in ``POLL_S`` polls."""
    waited = 0.0
    while True:
        try:
            return next(it)
        except StopIteration:
            return _END
        except RuntimeError as e:
            if "timed out" not in str(e):  # torch's "DataLoader worker (pid(s) ...) exited unexpectedly"
                raise worker_failure(e) or LoaderError(f"data loading failed: {_last_line(e)}") from None
        except Exception as e:  # a worker raised: torch re-raises it here with the worker's traceback as message
            raise LoaderError(f"data loading failed in a worker: {_last_line(e)}") from None
        waited += POLL_S
        stop = pending_stop()
        if stop:
            raise LoaderStopped(stop)
        if stall_s is not None and waited >= stall_s:
            raise LoaderError(
                f"data loading stalled: no batch from the loader's workers for {waited:.0f} s (a worker that ran out "
                f"of shared memory in {SHM}?); {SHM_HINT}, or pass --workers 0"
            )


def worker_failure(e: BaseException) -> LoaderError | None:
    """torch's error for a worker that died, as a ``LoaderError``, found in ``e`` or the errors it arose from; None
    for any other error.

    torch's SIGCHLD handler raises a worker's death wherever the training process is. Inside torch.save's writer
    (which calls back into Python to write) it comes out as the writer's own error, "unexpected pos", with the
    worker's death as its context: the run names the dead worker, not a broken disk.
    """
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, RuntimeError) and str(e).startswith("DataLoader worker"):
            return LoaderError(f"data loading failed: {_last_line(e)} (killed for memory? {SHM_HINT})")
        e = e.__cause__ or e.__context__
    return None


def _last_line(e: BaseException) -> str:
    """The informative line of an exception whose message may hold a whole traceback."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__
