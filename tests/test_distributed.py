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

from conftest import write_body_scans, write_volume
from ctmae.mae.checkpoint import load_checkpoint

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{TESTS.parent}", "OMP_NUM_THREADS": "1"}
TINY = ["--model", "tiny", "--crop", "32", "--patch", "8", "--workers", "0"]

pytestmark = pytest.mark.slow  # every test here launches torchrun or subprocesses


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
    return [json.loads(r)["loss"] for r in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def test_two_ranks_train_identical_weights_and_cache_each_volume_once(tmp_path, scans):
    out, cache = tmp_path / "run", tmp_path / "cache"
    done = torchrun(str(TESTS / "ddp_worker.py"), str(scans), str(out), str(cache))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt"]  # rank 0 alone wrote it
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 4
    assert len(list(cache.glob("*.b2nd"))) == 4 and len(list(cache.glob("*.json"))) == 4
    assert not list(cache.glob(".*"))  # no temporary files left behind


def test_two_rank_loss_curve_matches_one_process_with_the_same_global_batch(tmp_path, scans):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  log_every: 1\ndata:\n  crops_per_volume: 1\n", encoding="utf-8")
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
    cfg.write_text("train:\n  log_every: 1\n  ckpt_every: 100000\n", encoding="utf-8")
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
    while (
        not (metrics.is_file() and len(metrics.read_text(encoding="utf-8").splitlines()) >= 3)
        and time.time() < deadline
    ):
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
    assert [json.loads(r)["step"] for r in metrics.read_text(encoding="utf-8").splitlines()][-2:] == [
        step + 1,
        step + 2,
    ]


@pytest.fixture(scope="module")
def spheres(tmp_path_factory) -> Path:
    """Three labelled phantoms: a bright sphere (label 1) in noisy tissue."""
    root = tmp_path_factory.mktemp("spheres")
    rng = np.random.default_rng(3)
    grid = np.stack(np.meshgrid(*[np.arange(40)] * 3, indexing="ij"))
    for i in range(3):
        centre = rng.integers(14, 26, 3)
        label = (((grid - centre[:, None, None, None]) ** 2).sum(0) < 64).astype(np.uint8)
        image = rng.normal(40, 30, (40, 40, 40)) + 500.0 * label
        write_volume(root / "images" / f"case{i}.nii.gz", image.astype(np.int16), spacing=(1.5, 1.5, 1.5))
        write_volume(root / "labels" / f"case{i}.nii.gz", label, spacing=(1.5, 1.5, 1.5), dtype=np.uint8)
    return root


def finetune_args(spheres: Path, out: Path, batch: int, steps: int, *extra: str) -> list[str]:
    return [
        "-m",
        "ctmae",
        "finetune-seg",
        "--from-scratch",
        "--model",
        "tiny",
        "--images",
        str(spheres / "images"),
        "--labels",
        str(spheres / "labels"),
        "--out",
        str(out),
        "--crop",
        "32",
        "--batch-size",
        str(batch),
        "--crops-per-volume",
        "1",
        "--steps",
        str(steps),
        "--log-every",
        "1",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--feature-size",
        "8",
        *extra,
    ]


def test_two_rank_finetune_matches_one_process_with_the_same_global_batch(tmp_path, spheres):
    ddp = torchrun(*finetune_args(spheres, tmp_path / "ddp", 1, 3))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run(
        [sys.executable, *finetune_args(spheres, tmp_path / "one", 2, 3)],
        env=ENV,
        capture_output=True,
        encoding="utf-8",
        timeout=240,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    ddp_losses, one_losses = (
        [
            r["loss"]
            for r in map(json.loads, (d / "metrics.jsonl").read_text(encoding="utf-8").splitlines())
            if "loss" in r
        ]
        for d in (tmp_path / "ddp", tmp_path / "one")
    )
    assert len(ddp_losses) == 3 and np.allclose(ddp_losses, one_losses, rtol=1e-4, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_finetune_stop_signal_checkpoints_and_exits_cleanly(tmp_path, spheres):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, *finetune_args(spheres, out, 1, 100000, "--val-every", "100000")],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        encoding="utf-8",
    )
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while (
        not (metrics.is_file() and len(metrics.read_text(encoding="utf-8").splitlines()) >= 2)
        and time.time() < deadline
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "stopped early" in err and "Traceback" not in err, err[-2000:]
    from ctmae.seg.network import load_seg_checkpoint

    assert load_seg_checkpoint(out / "checkpoints" / "last.pt")["step"] >= 2
