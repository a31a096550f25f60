"""Loaders that cannot hang, tested the way containers break them: a small tmpfs over /dev/shm in a private mount
namespace (``unshare -m``), real worker processes, real scans, signals to the whole process group."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_body_scans
from ctmae.mae.checkpoint import load_checkpoint

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{TESTS.parent}", "PYTHONUNBUFFERED": "1"}
TRAIN = ["--model", "tiny", "--crop", "64", "--batch-size", "4", "--device", "cpu", "--workers", "2"]  # 4 MB a visit

# Runs the CLI with the shared-memory plan switched off and a short stall limit: the old loader's situation, so the
# bounded wait (not the plan) is what is tested.
UNPLANNED = """
import sys
import ctmae.preprocess.visit_order as schedule
import ctmae.runtime.resources as resources
resources.plan_workers = lambda workers, item_bytes: (workers, None)
schedule.STALL_S = float(sys.argv[1])
from ctmae.cli import main
sys.argv = ["ctmae", *sys.argv[2:]]
main()
"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("unshare"), reason="mounting a tmpfs over /dev/shm needs root and unshare"
    ),
]


def in_small_shm(size_mb: int, argv: list[str]) -> subprocess.Popen:
    """Run ``argv`` with a ``size_mb`` MB /dev/shm (Docker's default is 64 MB), as a new process group."""
    mount = f'mount -t tmpfs -o size={size_mb}m tmpfs /dev/shm && exec "$@"'
    return subprocess.Popen(
        ["unshare", "-m", "sh", "-c", mount, "sh", *argv],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        encoding="utf-8",
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    return write_body_scans(tmp_path_factory.mktemp("scans"), 2, seed=5)


def test_with_a_small_dev_shm_pretraining_cuts_its_workers_once_and_trains(tmp_path, scans):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ctmae", "pretrain", str(scans), "--out", str(run), *TRAIN, "--steps", "12"]
    proc = in_small_shm(24, [*cmd, "--cache-dir", str(tmp_path / "cache")])
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert err.count("/dev/shm has 24 MB free") == 1 and "1 worker(s) instead" in err and "--shm-size 2g" in err
    assert "1 loader worker(s)" in out
    assert "unable to allocate shared memory" not in err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 12


def test_a_loader_that_stalls_ends_the_run_with_one_line_and_keeps_the_checkpoint(tmp_path, scans):
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", UNPLANNED, "4", "pretrain", str(scans), "--out", str(run), *TRAIN, "--steps", "50"]
    started = time.monotonic()
    proc = in_small_shm(4, [*cmd, "--cache-dir", str(tmp_path / "cache")])  # not even one 4 MB visit fits
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert time.monotonic() - started < 60
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "data loading stalled" in lines[0] and "--shm-size 2g" in lines[0]
    assert "Traceback" not in out


def test_a_stop_signal_while_the_loader_stalls_stops_the_run_with_a_checkpoint(tmp_path, scans):
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", UNPLANNED, "600", "pretrain", str(scans), "--out", str(run), *TRAIN, "--steps", "50"]
    proc = in_small_shm(4, [*cmd, "--cache-dir", str(tmp_path / "cache")])
    deadline = time.monotonic() + 120
    while not (run / "train.log").is_file() or "starting step" not in (run / "train.log").read_text("utf-8"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    time.sleep(3)  # the workers have failed to hand over their first visit: the training process is waiting
    os.killpg(proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 15
    assert proc.returncode == 0, err[-3000:]
    assert "stopped early" in err and "stop signal (SIGTERM)" in err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 0
    assert "stopped: stop signal (SIGTERM) after step 0" in (run / "train.log").read_text("utf-8")


def test_a_loader_worker_killed_mid_run_ends_it_with_one_line_and_the_last_checkpoint(tmp_path, scans):
    """The kernel's OOM killer takes a worker: one line naming it, exit 1, the periodic checkpoint kept."""
    run, every_2 = tmp_path / "run", tmp_path / "every2.yaml"
    every_2.write_text("train:\n  ckpt_every: 2\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "ctmae", "pretrain", str(scans), "--out", str(run), *TRAIN, "--steps", "100000"]
    proc = subprocess.Popen(
        [*cmd, "--crop", "32", "--patch", "8", "--cache-dir", str(tmp_path / "cache"), "--config", str(every_2)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        encoding="utf-8",
        start_new_session=True,
    )
    last = run / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 2, children  # the two loader workers
    os.kill(int(children[0]), signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(("error:", "internal error:"))]
    # one line naming the dead worker (torch raises it wherever the process is: in the loop, or in a checkpoint write)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "DataLoader worker" in lines[0], err[-3000:]
    assert "Traceback" not in err
    assert load_checkpoint(last)["step"] % 2 == 0  # a periodic checkpoint, intact
