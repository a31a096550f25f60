"""The CPU budget a run was given, computed once at start, and the thread and worker counts that follow from it.

A container started with ``--cpus 4`` on a 64-core host, or a SLURM job given 8 of 64 cores without a cpuset, still
sees 64 cores in ``os.cpu_count()``; PyTorch would start 64 OpenMP threads that spin on cores other jobs hold. The
budget is the smallest of: the cores in this process's affinity mask, the cgroup CPU quota (``cpu.max`` in cgroup v2,
``cpu.cfs_quota_us``/``cpu.cfs_period_us`` in v1), ``SLURM_CPUS_PER_TASK``, ``OMP_NUM_THREADS`` when a user set it, and
``--threads`` / ``CTMAE_THREADS``. torchrun's ranks on one node share it. A fractional quota rounds down (at least
one core): a thread more than the quota pays is throttled, which costs more than a core left idle.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
MAX_WORKERS = 8  # data-loader processes worth having; more only add memory and start-up time


@dataclass(frozen=True)
class CpuBudget:
    """The cores this process may keep busy, and what limited them."""

    cores: int  # cores for this process (its share when several ranks run on the node)
    host: int  # cores the machine has (os.cpu_count)
    limit: str  # what set ``cores``: "affinity", "cgroup quota", "SLURM_CPUS_PER_TASK", "--threads", ...
    ranks: int = 1  # processes on this node sharing the budget (torchrun's LOCAL_WORLD_SIZE)

    def describe(self) -> str:
        """The start line's wording: ``cpu budget: 4 of 64 cores (cgroup quota)``."""
        share = f", shared by {self.ranks} processes on this node" if self.ranks > 1 else ""
        return f"cpu budget: {self.cores} of {self.host} cores ({self.limit}{share})"


def cgroup_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs allowed by the cgroup CPU quota of this process (v2 or v1), or None when there is none.

    A container usually sees its own cgroup mounted at the root; on a host the process's cgroup path from
    ``/proc/self/cgroup`` names the folder. Every folder from there up to the root is read (a parent's quota caps its
    children) and the smallest quota wins.
    """
    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    quotas = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2's unified hierarchy: "0::/path"
            quotas += [_v2_quota(d) for d in _up_from(root, path)]
        elif "cpu" in controllers.split(","):
            for mount in {controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu"}:
                quotas += [_v1_quota(d) for d in _up_from(root / mount, path)]
    if not lines:  # no /proc/self/cgroup (not Linux, or hidden): the root alone
        quotas += [_v2_quota(root), _v1_quota(root / "cpu")]
    quotas = [q for q in quotas if q is not None]
    return min(quotas) if quotas else None


def _up_from(root: Path, path: str) -> list[Path]:
    """``root/path`` and each of its parents up to ``root`` (the ones that exist)."""
    rel = Path(path.strip().lstrip("/"))
    folders = [root / rel, *[root / p for p in rel.parents]]
    return [f for f in folders if f.is_dir()]


def _v2_quota(folder: Path) -> float | None:
    """``cpu.max`` holds "QUOTA PERIOD" in microseconds, or "max PERIOD" for no limit."""
    try:
        quota, period = (folder / "cpu.max").read_text(encoding="utf-8").split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(folder: Path) -> float | None:
    """``cpu.cfs_quota_us`` (-1 for no limit) over ``cpu.cfs_period_us``."""
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text(encoding="utf-8"))
        period = int((folder / "cpu.cfs_period_us").read_text(encoding="utf-8"))
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _positive_int(name: str, value: str | None) -> int | None:
    if value in (None, ""):
        return None
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a whole number of cores, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return n


def cpu_budget(
    threads: int | None = None,
    environ: os._Environ | dict[str, str] | None = None,
    cgroup_root: Path = CGROUP_ROOT,
    proc_cgroup: Path = PROC_CGROUP,
) -> CpuBudget:
    """The CPU budget of this process.

    Args:
        threads: ``--threads``: an explicit cap (None: none).
        environ: the environment to read (``os.environ``); ``CTMAE_THREADS``, ``SLURM_CPUS_PER_TASK``,
            ``OMP_NUM_THREADS`` (ignored under torchrun, which sets it to 1 on its own) and ``LOCAL_WORLD_SIZE``.
        cgroup_root, proc_cgroup: where the cgroup files are (tests point them at a temporary folder).

    Raises:
        ValueError: ``--threads`` or ``CTMAE_THREADS`` is not a whole number >= 1.
    """
    env = os.environ if environ is None else environ
    host = os.cpu_count() or 1
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else host
    candidates: list[tuple[int, str]] = [(affinity, "affinity" if affinity < host else "all cores")]
    quota = cgroup_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        candidates.append((max(1, math.floor(quota + 1e-9)), "cgroup quota"))
    ranks = _positive_int("LOCAL_WORLD_SIZE", env.get("LOCAL_WORLD_SIZE")) or 1
    try:
        slurm = _positive_int("SLURM_CPUS_PER_TASK", env.get("SLURM_CPUS_PER_TASK"))
    except ValueError:
        slurm = None  # SLURM's own variable: not the user's mistake to report
    if slurm:
        candidates.append((slurm, "SLURM_CPUS_PER_TASK"))
    if ranks == 1:
        omp = _positive_int("OMP_NUM_THREADS", env.get("OMP_NUM_THREADS")) if env.get("OMP_NUM_THREADS") else None
        if omp:
            candidates.append((omp, "OMP_NUM_THREADS"))
    own = _positive_int("CTMAE_THREADS", env.get("CTMAE_THREADS"))
    if own:
        candidates.append((own * ranks, "CTMAE_THREADS"))
    if threads is not None:
        candidates.append((_positive_int("--threads", str(threads)) * ranks, "--threads"))
    cores, limit = min(candidates, key=lambda c: c[0])
    return CpuBudget(cores=max(1, cores // ranks), host=host, limit=limit, ranks=ranks)


def split_budget(budget: CpuBudget, device: str, workers: int | None) -> tuple[int, int]:
    """(torch threads, data-loader workers) for a run on ``device`` ("cpu" or "cuda").

    ``workers`` None is automatic: on a GPU the training process needs few CPU threads, so half the budget loads data
    (at most ``MAX_WORKERS``); on a CPU the model's threads need the cores and one worker per four cores feeds them
    (none below four: a worker on a 2-core machine slows the step it feeds). The training process keeps the rest.
    """
    if workers is None:
        workers = budget.cores // 2 if device == "cuda" else budget.cores // 4
        workers = min(workers, MAX_WORKERS)
    return max(1, budget.cores - workers), workers


_IN_FORCE: list[CpuBudget] = []  # the budget this process runs under, once a command has applied one


def current_budget() -> CpuBudget:
    """The budget a command applied (``apply_threads``), else this process's budget as read now."""
    return _IN_FORCE[-1] if _IN_FORCE else cpu_budget()


def apply_threads(budget: CpuBudget, threads: int) -> None:
    """Hold torch's intra- and inter-op pools and SimpleITK's filters to ``threads``, and keep ``budget`` as the
    one later steps (cache builds) divide among their workers.

    blosc2 stays at one thread per call (``ctmae.preprocess.cache``): its pools do not survive fork, and the
    parallelism of the cache is in worker processes, each inside the budget.
    """
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # settable once per process, before any inter-op work: a second run in-process keeps it
        pass
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    _IN_FORCE[:] = [budget]
