"""What a command may use of the machine, planned once at its start: the CPU budget split into torch threads and
data-loader workers, and the workers cut to what ``/dev/shm`` holds."""

from __future__ import annotations

from dataclasses import dataclass

from ctmae.runtime.cpu import CpuBudget, apply_threads, cpu_budget, split_budget
from ctmae.runtime.loader import plan_workers
from ctmae.runtime.openmp import POLICY


@dataclass(frozen=True)
class Resources:
    budget: CpuBudget
    threads: int  # torch / SimpleITK threads of this process
    workers: int  # data-loader processes
    notes: tuple[str, ...] = ()  # lines to show (workers cut for shared memory)

    def describe(self) -> str:
        """The start line: ``cpu budget: 4 of 64 cores (cgroup quota); 3 torch thread(s), 1 loader worker(s)``, and
        how OpenMP's threads wait when the command line chose it (``ctmae.runtime.openmp``)."""
        line = f"{self.budget.describe()}; {self.threads} torch thread(s), {self.workers} loader worker(s)"
        return f"{line}; OpenMP threads {POLICY[0]}" if POLICY else line


def plan_resources(threads: int | None, device: str, workers: int | None, item_bytes: int = 0) -> Resources:
    """Plan and apply this process's threads and workers.

    Args:
        threads: ``--threads`` (None: the budget alone decides).
        device: "cpu" or "cuda" (how the budget is split: ``ctmae.runtime.cpu.split_budget``).
        workers: ``--workers`` (None: automatic).
        item_bytes: bytes of one loader item (a visit's crops), to fit the workers into ``/dev/shm``; 0 skips that.

    Raises:
        ValueError: a bad ``--threads`` / ``CTMAE_THREADS``.
    """
    budget = cpu_budget(threads)
    n_threads, n_workers = split_budget(budget, device, workers)
    note = None
    if item_bytes:
        n_workers, note = plan_workers(n_workers, item_bytes)
    apply_threads(budget, n_threads)
    return Resources(budget, n_threads, n_workers, (note,) if note else ())
