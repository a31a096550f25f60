"""What every benchmark row shares: timing figures, the interleaved timer, the machine's description, table rows.

A figure is a list of repeats summarised as median (min–max). Timings that are compared are taken interleaved, with
the order reversed every round (A B, B A, A B, ...), so a burst of load from elsewhere hits both sides alike.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

START = time.perf_counter()


def progress(message: str) -> None:
    """One progress line on stderr, prefixed by the seconds since the run started."""
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass
class Figure:
    """Repeated measurements of one quantity; ``unit`` is for printing (e.g. "s", "crops/s", "MiB")."""

    values: list[float]
    unit: str

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def fmt(self, scale: float = 1.0, unit: str | None = None, digits: int = 3) -> str:
        """``median (min–max) unit [n=N]`` with ``digits`` significant digits."""
        v = [x * scale for x in self.values]
        med = statistics.median(v)
        spread = f" ({_num(min(v), digits)}–{_num(max(v), digits)})" if len(v) > 1 else ""
        return f"{_num(med, digits)}{spread} {unit or self.unit} [n={len(v)}]"


def _num(x: float, digits: int) -> str:
    return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, label: str = "") -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` rounds, order reversed every other round."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
        if label:
            last = ", ".join(f"{n} {times[n][-1]:.3g}s" for n in names)
            progress(f"{label} round {r + 1}/{repeats}: {last}")
    return times


def matmul_flops(n: int = 2048, reps: int = 3) -> list[float]:
    """FLOP/s of ``reps`` fp32 n×n matmuls (2n³ FLOP each), timed one by one after one warm-up."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        out.append(2 * n**3 / (time.perf_counter() - t0))
    return out


def machine() -> dict[str, str]:
    """CPU model, cores, versions, threads, date and load; the header of BENCHMARKS.md."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import monai
    import numpy
    import SimpleITK

    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "CPU": cpu,
        "cores": f"{os.cpu_count()} logical, {len(os.sched_getaffinity(0))} usable by this process",
        "torch": f"{torch.__version__} (MONAI {monai.__version__}, numpy {numpy.__version__}, "
        f"SimpleITK {SimpleITK.Version_VersionString()}, Python {platform.python_version()})",
        "device": "cpu (fp32)",
        "threads": f"torch.get_num_threads() = {torch.get_num_threads()}",
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "load average at start (1/5/15 min)": load,
    }


@dataclass(frozen=True)
class Target:
    """A row's goal: ``value op bound`` on the row's ratio (or on ctmae's own figure when ``on_ctmae``)."""

    op: str  # ">=" or "<="
    bound: float
    text: str  # as printed, e.g. "≥ 1.5×"
    on_ctmae: bool = False

    def met(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value >= self.bound if self.op == ">=" else value <= self.bound


@dataclass
class Row:
    """One line of the results table, and its note."""

    measure: str
    ctmae: str
    reference: str
    ratio: float | None
    target: Target | None
    notes: str = ""
    ctmae_value: float | None = None  # what the target is checked on when ``target.on_ctmae``
    ratio_text: str = field(default="")

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.target.met(self.ctmae_value if self.target.on_ctmae else self.ratio)


def not_measured(measure: str, target: Target, reason: str) -> Row:
    return Row(measure, "not measured", "not measured", None, target, notes=f"Not measured: {reason}")


_PEAK_READ = """
import sys
from ctmae.io.volume import CTReader


def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


CTReader().read(sys.argv[1])  # warm-up: lazy imports and allocator pools
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak resident size, which a process started by fork + exec inherits from its parent
resident = status("VmRSS")
image = CTReader().read(sys.argv[2])
print(status("VmHWM") - resident)
"""


def peak_read_bytes(warmup: Path, path: Path) -> int:
    """Peak resident bytes that ``CTReader().read(path)`` adds in a fresh process, after a warm-up read of
    ``warmup``: VmHWM (reset through /proc/self/clear_refs) minus the resident size before the read. Linux only;
    RuntimeError with the child's stderr when it fails. The benchmark and tests/test_io.py both measure with it."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-c", _PEAK_READ, str(warmup), str(path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return int(done.stdout.split()[-1])
