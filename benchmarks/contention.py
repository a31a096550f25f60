"""The demo's speed on a CPU shared with other work: alone, beside two busy-loop processes, beside a second demo,
and with the CPU limited by a container quota against a pinned core.

Each case runs the real command (``ctmae pretrain --out R --steps N --device cpu``, the demo's recipe on the bundled
scans, cache warm) and reads the crops/s the run itself logged in ``metrics.jsonl`` (training only) plus the wall time
of the whole command. "ctmae" is the command as shipped: its OpenMP threads spin when the machine is idle at start
and sleep when it is shared (``ctmae.runtime.openmp``); ``OMP_WAIT_POLICY=PASSIVE`` (always sleep) and an empty
``OMP_WAIT_POLICY`` (libgomp's own spin, whatever the load) are the two fixed policies for comparison. The alone
cases run interleaved, ``--rounds`` times, the order reversed every round. Run it alone on the machine: it is about
the machine's load, so anything else running makes the figures meaningless.

    python -m benchmarks.contention [--steps 150] [--rounds 3] [--image TAG]   # writes benchmarks/contention_results.md

``--image`` also times the demo in the container image (``podman run --cpus 1``) against ``taskset -c 0`` on the host.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import progress

REPO = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "contention_results.md"
HOG = [sys.executable, "-c", "while True: pass"]
LIBGOMP_DEFAULT = {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "300000"}  # libgomp's own default, given explicitly
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}
STAGGER_S = 5  # the second demo of the staggered case starts this long after the first (which chose to spin)


def demo(run_dir: Path, steps: int, env: dict[str, str], prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [*prefix, sys.executable, "-m", "ctmae", "pretrain", "--out", str(run_dir), "--steps", str(steps)]
    return subprocess.Popen(
        [*cmd, "--device", "cpu"], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen, run_dir: Path, started: float) -> dict[str, float]:
    """Wait for a demo; its logged crops/s (last metrics row) and the command's wall time."""
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the demo failed: {err[-2000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text("utf-8").splitlines() if line]
    return {"crops_per_s": rows[-1]["crops_per_s"], "wall_s": time.perf_counter() - started}


def case(
    name: str, steps: int, omp: dict | None = None, hog: int = 0, demos: int = 1, prefix=(), stagger: float = 0
) -> dict:
    """Run ``demos`` demos (each ``stagger`` s after the previous) beside ``hog`` busy loops, with ``omp`` in the
    environment; the slowest demo's figures."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT")}
    env.update(omp or {})
    hogs = [subprocess.Popen(HOG) for _ in range(hog)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            runs = []
            for i in range(demos):
                if i and stagger:
                    time.sleep(stagger)
                runs.append((demo(Path(tmp) / f"r{i}", steps, env, prefix), Path(tmp) / f"r{i}"))
            figures = [finish(p, r, t0) for p, r in runs]
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    result = min(figures, key=lambda f: f["crops_per_s"])
    progress(f"{name}: {result['crops_per_s']:.1f} crops/s, {result['wall_s']:.0f} s")
    return {"case": name, **result}


def container_case(image: str, steps: int, cpus: str) -> dict:
    """The demo inside the image with ``--cpus``: its own metrics, read from a mounted run folder."""
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o777)
        t0 = time.perf_counter()
        # what the image's ctmae sets itself; given explicitly, so an older image is measured alike
        omp = ["-e", "OMP_WAIT_POLICY=PASSIVE"]
        cmd = [
            "podman",
            "run",
            "--rm",
            "--cpus",
            cpus,
            *omp,
            "-v",
            f"{tmp}:/runs",
            image,
            "pretrain",
            "--out",
            "/runs/d",
        ]
        out = subprocess.run([*cmd, "--steps", str(steps), "--device", "cpu"], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"the container demo failed: {out.stderr[-2000:]}")
        budget = next((line for line in out.stdout.splitlines() if line.startswith("cpu budget")), "")
        rows = [json.loads(line) for line in (Path(tmp) / "d" / "metrics.jsonl").read_text("utf-8").splitlines()]
    result = {"case": f"podman run --cpus {cpus} ({budget.split(';')[0]})", "crops_per_s": rows[-1]["crops_per_s"]}
    result["wall_s"] = time.perf_counter() - t0
    progress(f"{result['case']}: {result['crops_per_s']:.1f} crops/s")
    return result


def median_row(name: str, runs: list[dict]) -> dict:
    """The run with the median crops/s, named ``name`` and listing every round's figure."""
    ordered = sorted(runs, key=lambda r: r["crops_per_s"])
    each = ", ".join(f"{r['crops_per_s']:.1f}" for r in runs)
    return {**ordered[len(ordered) // 2], "case": f"{name}: {each}"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the alone cases")
    parser.add_argument("--image", help="container image to time with podman run --cpus 1 against taskset -c 0")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:  # warm the cache, so every case times training alone
        subprocess.run(
            [sys.executable, "-m", "ctmae", "pretrain", "--out", f"{tmp}/w", "--steps", "1", "--device", "cpu"],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
    s = args.steps
    alone_settings = [("ctmae", None), ("always sleep (PASSIVE)", PASSIVE), ("always spin (libgomp)", LIBGOMP_DEFAULT)]
    alone: dict[str, list[dict]] = {name: [] for name, _ in alone_settings}
    for r in range(args.rounds):
        for name, omp in alone_settings if r % 2 == 0 else alone_settings[::-1]:
            alone[name].append(case(f"alone, {name}, round {r + 1}", s, omp=omp))
    rows = [median_row(f"alone, {name} (median of {args.rounds})", runs) for name, runs in alone.items()]
    rows += [
        case("beside 2 busy loops (ctmae)", s, hog=2),
        case("beside 2 busy loops, always spin", s, omp=LIBGOMP_DEFAULT, hog=2),
        case("2 demos side by side (ctmae; the slower one)", s, demos=2),
        case(
            f"2 demos, the second {STAGGER_S} s after the first (ctmae; the slower one)", s, demos=2, stagger=STAGGER_S
        ),
    ]
    if args.image and shutil.which("podman"):
        rows.append(case("taskset -c 0 (one pinned core)", s, prefix=("taskset", "-c", "0")))
        rows.append(container_case(args.image, s, "1"))
    base = rows[0]["crops_per_s"]
    date = datetime.date.today().isoformat()
    lines = [
        "## The demo on a shared CPU",
        "",
        f"`python -m benchmarks.contention --steps {s}{' --image ' + args.image if args.image else ''}`, {date}, "
        f"{os.cpu_count()} cores, load average {load[0]:.2f} before the run. crops/s is the demo's own training rate "
        f"(metrics.jsonl), wall the whole command with start-up; with two demos, the slower one.",
        "",
        "| case | crops/s | vs alone | wall s |",
        "|---|---|---|---|",
        *[
            f"| {r['case']} | {r['crops_per_s']:.1f} | {r['crops_per_s'] / base:.2f} | {r['wall_s']:.0f} |"
            for r in rows
        ],
        "",
    ]
    OUT.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
