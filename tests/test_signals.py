"""Stop signals as a cluster and a terminal send them: to the whole process group, data-loader workers included.

SLURM, ``timeout`` and Ctrl-C signal every process of the job. Each test starts ctmae in a session of its own and
signals that process group, with data-loader workers running, the way those tools do.
"""

from __future__ import annotations

import json
import os
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
SMALL = ["--model", "tiny", "--crop", "32", "--patch", "8", "--batch-size", "2", "--steps", "100000"]


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    return write_body_scans(tmp_path_factory.mktemp("scans"), 2, seed=3)


def start(cmd: list[str]) -> subprocess.Popen:
    """Start ctmae as the leader of a new process group, as a job step or a terminal's foreground job is."""
    return subprocess.Popen(
        [sys.executable, "-m", "ctmae", *cmd],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        encoding="utf-8",
        start_new_session=True,
    )


def wait_for_training(run_dir: Path, proc: subprocess.Popen, after_step: int = 0, timeout: float = 120) -> None:
    """Wait until metrics.jsonl holds a row past ``after_step``: workers are up and steps are running."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.is_file():
            steps = [json.loads(r)["step"] for r in metrics.read_text(encoding="utf-8").splitlines() if r.strip()]
            if steps and steps[-1] > after_step:
                return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("training did not start in time")


def signal_group(proc: subprocess.Popen, sig: int) -> tuple[int, str, str]:
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def pretrain_cmd(scans: Path, run_dir: Path, tmp_path: Path, workers: int = 2) -> list[str]:
    return [
        "pretrain",
        str(scans),
        "--out",
        str(run_dir),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--workers",
        str(workers),
        "--resume",
        *SMALL,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_group_stop_signal_with_workers_checkpoints_every_time(tmp_path, scans, sig):
    """Three rounds of: train with 2 workers, signal the whole group, exit 0 with a checkpoint, resume."""
    run_dir, step = tmp_path / "run", 0
    for _ in range(3):
        proc = start(pretrain_cmd(scans, run_dir, tmp_path))
        wait_for_training(run_dir, proc, after_step=step)
        code, out, err = signal_group(proc, sig)
        assert code == 0, err
        assert "Traceback" not in err + out and "internal error" not in err + out and "killed by signal" not in err
        reached = load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]
        assert reached > step
        assert f"stop signal ({sig.name}) after step {reached}" in err
        step = reached
    assert f"resuming from step {step}" not in out  # the last round resumed from the one before
    assert "resuming from step" in out


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, scans):
    run_dir = tmp_path / "run"
    proc = start(pretrain_cmd(scans, run_dir, tmp_path))
    wait_for_training(run_dir, proc)
    code, out, err = signal_group(proc, signal.SIGINT)
    assert code == 130, err
    assert f"no checkpoint in {run_dir}, starting fresh" in out
    assert "Ctrl-C: finishing this step and saving a checkpoint" in err
    step = load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]
    assert f"interrupted: checkpoint saved at step {step}" in err
    assert "Traceback" not in err + out

    proc = start(pretrain_cmd(scans, run_dir, tmp_path))  # --resume says where it continues
    wait_for_training(run_dir, proc, after_step=step)
    code, out, err = signal_group(proc, signal.SIGTERM)
    assert code == 0 and f"resuming from step {step}" in out


def test_a_second_ctrl_c_aborts_at_once(tmp_path, scans):
    """The first Ctrl-C asks for a checkpoint after the step; a second one, before it is reached, aborts."""
    run_dir = tmp_path / "run"
    cmd = pretrain_cmd(scans, run_dir, tmp_path, workers=0)
    cmd[cmd.index("--crop") + 1] = "64"  # slower steps, so both signals land inside one
    proc = start(cmd)
    wait_for_training(run_dir, proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    code, out, err = signal_group(proc, signal.SIGINT)
    assert code == 130 and "interrupted" in err and "Traceback" not in err, err[-3000:]


@pytest.mark.slow
def test_finetune_group_sigterm_with_workers_keeps_the_run(tmp_path):
    import numpy as np

    from conftest import write_volume

    images, labels = tmp_path / "images", tmp_path / "labels"
    for i in range(2):
        rng = np.random.default_rng(i)
        ct = np.full((40, 40, 40), -1000.0)
        ct[5:35, 5:35, 5:35] = 40 + rng.normal(0, 10, (30, 30, 30))
        lab = np.zeros((40, 40, 40))
        lab[15:25, 15:25, 15:25] = 1
        ct[lab > 0] = 200
        write_volume(images / f"case{i}.nii.gz", ct, spacing=(1.5, 1.5, 1.5))
        write_volume(labels / f"case{i}.nii.gz", lab, spacing=(1.5, 1.5, 1.5))
    run_dir = tmp_path / "seg"
    cmd = ["finetune-seg", "--from-scratch", "--model", "tiny", "--images", str(images), "--labels", str(labels)]
    cmd += ["--out", str(run_dir), "--crop", "32", "--steps", "100000", "--val-every", "100000", "--workers", "2"]
    proc = start(cmd)
    wait_for_training(run_dir, proc)
    code, out, err = signal_group(proc, signal.SIGTERM)
    assert code == 0, err
    assert "Traceback" not in err + out and "killed by signal" not in err
    assert (run_dir / "checkpoints" / "last.pt").is_file()
