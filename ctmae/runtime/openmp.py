"""How PyTorch's OpenMP threads wait between operations: spin on a machine that is the run's own, sleep on a shared one.

PyTorch's OpenMP threads (GNU libgomp in the pip wheels) spin for up to 300,000 iterations before they sleep. On an
idle machine that is the fastest way to wait (the CPU demo ran 1.1 to 1.7 times as fast as with threads that sleep
at once, by machine). Beside other busy processes they spin on cores those processes need, and a run falls to a
fifth of its fair share; the passive policy (sleep at once) gives it back (measured in BENCHMARKS.md, "The demo on a
shared CPU"). The runtime reads the policy once, when torch loads it, so the command line calls ``decide`` first,
before anything imports torch:

- the machine is this run's own (every core in the affinity mask, no cgroup quota below the host's cores, not a SLURM
  job, not one of several torchrun ranks, no ``OMP_NUM_THREADS``/``CTMAE_THREADS`` cap), no other ctmae command is
  running (two started together would each see the other still asleep in its own sample), and other processes kept
  less than a quarter of a core busy over a short sample at start: libgomp's own spin;
- otherwise ``OMP_WAIT_POLICY=PASSIVE`` (libgomp, LLVM's libomp) and ``KMP_BLOCKTIME=0`` (Intel's libiomp5).

A policy the user set (``OMP_WAIT_POLICY``, ``KMP_BLOCKTIME`` or ``GOMP_SPINCOUNT``) is kept. Data-loader workers
(forked) inherit the decision; torchrun's ranks are always passive. The choice cannot change later in the run: a
machine that becomes busy after the start keeps spinning threads, so on a workstation shared with later jobs set
``OMP_WAIT_POLICY=PASSIVE``.
"""

from __future__ import annotations

import os
import time

from ctmae.runtime.cpu import cgroup_quota

PASSIVE = {
    "OMP_WAIT_POLICY": "PASSIVE",  # GNU libgomp (PyTorch's pip wheels) and LLVM's libomp
    "KMP_BLOCKTIME": "0",  # Intel's libiomp5 (MKL-linked builds): sleep at once after a parallel region (not measured)
}
USER_SET = ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT")
SHARED_ENV = ("SLURM_JOB_ID", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS", "CTMAE_THREADS")
SAMPLE_S = 0.15  # how long the machine's load is sampled at start
BUSY_CORES = 0.25  # other processes' use (in cores) above which the machine counts as shared

POLICY: list[str] = []  # what was decided, for the start line: "spin (...)" / "sleep (...)"


def busy_cores(sample_s: float = SAMPLE_S, stat: str = "/proc/stat") -> float | None:
    """Cores kept busy by other processes while this one sleeps ``sample_s`` (None: no ``/proc/stat``)."""

    def read() -> tuple[int, int]:
        with open(stat, encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = read()
        time.sleep(sample_s)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    if total <= 0:
        return None
    return (total - (idle1 - idle0)) / total * (os.cpu_count() or 1)


def other_ctmae_runs(proc: str = "/proc") -> int:
    """How many other ctmae commands run on this machine (``ctmae ...`` or ``python -m ctmae ...``), this process's
    ancestors (a torchrun or shell that started it) excluded."""
    mine = set()
    pid = os.getpid()
    while pid > 1 and pid not in mine:
        mine.add(pid)
        try:
            with open(f"{proc}/{pid}/stat", encoding="ascii", errors="replace") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])  # field 4, after the command name in parentheses
        except (OSError, ValueError, IndexError):
            break
    count = 0
    try:
        pids = [int(name) for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        return 0
    for other in pids:
        if other in mine:
            continue
        try:
            with open(f"{proc}/{other}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        script = any(os.path.basename(a) == b"ctmae" for a in argv[:2])  # ctmae, or python .../bin/ctmae (shebang)
        if script or argv[1:3] == [b"-m", b"ctmae"]:
            count += 1
    return count


def machine_is_ours(environ: dict[str, str] | os._Environ = os.environ) -> str | None:
    """Why this machine counts as shared (a short reason), or None when it is this run's own and idle."""
    for name in SHARED_ENV:
        if environ.get(name):
            return name
    host = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) < host:
        return "affinity"
    quota = cgroup_quota()
    if quota is not None and quota < host:
        return "cgroup quota"
    others = other_ctmae_runs()
    if others:
        return f"{others} other ctmae run(s)"
    busy = busy_cores()
    if busy is None:
        return "load unknown"
    if busy >= BUSY_CORES:
        return f"{busy:.1f} cores busy at start"
    return None


def choose_wait_policy(environ: dict[str, str] | os._Environ = os.environ) -> str:
    """Set the OpenMP wait policy in ``environ`` (unless the user set one) and say which it is."""
    if any(environ.get(name) for name in USER_SET):
        return f"as set (OMP_WAIT_POLICY={environ.get('OMP_WAIT_POLICY', '')})"
    shared = machine_is_ours(environ)
    if shared is None:
        return "spin (machine idle at start)"
    for name, value in PASSIVE.items():
        environ[name] = value
    return f"sleep ({shared})"


def decide() -> None:
    """Choose the policy for this process (the command line's first step) and keep it for the start line."""
    POLICY[:] = [choose_wait_policy()]
