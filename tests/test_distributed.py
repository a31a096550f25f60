"""Scale-out on CPU: two gloo ranks under torchrun, stop signals, and the shared cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_body_scans
from ctmae.checkpoint import load_checkpoint

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{TESTS.parent}", "OMP_NUM_THREADS": "1"}
TINY = ["--model", "tiny", "--crop", "32", "--patch", "8", "--workers", "0"]


def torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        str(_free_port()),
        *args,
    ]
    return subprocess.run(cmd, env=ENV, capture_output=True, encoding="utf-8", timeout=timeout)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """Four small synthetic CT-like volumes."""
    return write_body_scans(tmp_path_factory.mktemp("scans"), 4, seed=0)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(r)["loss"] for r in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_train_identical_weights_and_cache_each_volume_once(tmp_path, scans):
    out, cache = tmp_path / "run", tmp_path / "cache"
    done = torchrun(str(TESTS / "ddp_worker.py"), str(scans), str(out), str(cache))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt"]  # rank 0 alone wrote it
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 4
    assert len(list(cache.glob("*.npy"))) == 4 and len(list(cache.glob("*.json"))) == 4
    assert not list(cache.glob(".*"))  # no temporary files left behind


def test_two_rank_loss_curve_matches_one_process_with_the_same_global_batch(tmp_path, scans):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  log_every: 1\ndata:\n  crops_per_volume: 1\n")
    common = [str(scans), "--steps", "5", "--cache-dir", str(tmp_path / "cache"), "--config", str(cfg), *TINY]
    ddp = torchrun("-m", "ctmae", "pretrain", "--out", str(tmp_path / "ddp"), "--batch-size", "1", *common)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "global batch 2" in ddp.stdout
    single = subprocess.run(
        [sys.executable, "-m", "ctmae", "pretrain", "--out", str(tmp_path / "one"), "--batch-size", "2", *common],
        env=ENV,
        capture_output=True,
        encoding="utf-8",
        timeout=240,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    assert np.allclose(losses(tmp_path / "ddp"), losses(tmp_path / "one"), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_stop_signal_checkpoints_and_resume_continues(tmp_path, scans, sig):
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  log_every: 1\n  ckpt_every: 100000\n")
    cmd = [
        sys.executable,
        "-m",
        "ctmae",
        "pretrain",
        str(scans),
        "--out",
        str(out),
        "--steps",
        "100000",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--config",
        str(cfg),
        *TINY,
    ]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8")
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.2)
    sent = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert time.time() - sent < 30 and "stopped early" in err and "Traceback" not in err
    step = load_checkpoint(out / "checkpoints" / "last.pt")["step"]
    assert step >= 3
    resumed = subprocess.run(
        [*cmd[: cmd.index("--steps") + 1], str(step + 2), *cmd[cmd.index("--steps") + 2 :], "--resume"],
        env=ENV,
        capture_output=True,
        encoding="utf-8",
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == step + 2
    assert [json.loads(r)["step"] for r in metrics.read_text().splitlines()][-2:] == [step + 1, step + 2]
