"""Faults: kill -9 and resume, death during a checkpoint write, non-finite losses, damaged cache, disk full."""

from __future__ import annotations

import errno
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
from typer.testing import CliRunner

import ctmae.runtime.checkpoint
from conftest import write_body_scans
from ctmae.cli import app
from ctmae.io.discovery import find_volumes
from ctmae.mae.checkpoint import load_checkpoint
from ctmae.mae.config import RunConfig
from ctmae.mae.model import MaskedAutoencoder3D
from ctmae.mae.train import MAX_BAD_STEPS, pretrain
from ctmae.preprocess.cache import VolumeCache
from ctmae.runtime.checkpoint import save_checkpoint
from ctmae.runtime.loader import LoaderError

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{TESTS.parent}"}
TINY = ["--model", "tiny", "--crop", "32", "--patch", "8", "--workers", "0"]
SMALLER = ["--crop", "32", "--patch", "8", "--workers", "0"]  # with config(): a 2-block tiny model


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """Two small synthetic CT-like volumes."""
    return write_body_scans(tmp_path_factory.mktemp("scans"), 2, seed=1)


def config(tmp_path: Path, **train) -> Path:
    path = tmp_path / "c.yaml"
    train_lines = "".join(f"  {k}: {v}\n" for k, v in {"log_every": 1, **train}.items())
    path.write_text(
        f"model:\n  size: tiny\n  depth: 2\ntrain:\n{train_lines}", encoding="utf-8"
    )  # 2 blocks keep these runs short
    return path


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_losses(tmp_path, scans):
    cmd = [
        sys.executable,
        "-m",
        "ctmae",
        "pretrain",
        str(scans),
        "--steps",
        "12",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--config",
        str(config(tmp_path, ckpt_every=3)),
        *SMALLER,
    ]
    full = subprocess.run([*cmd, "--out", str(tmp_path / "full")], env=ENV, capture_output=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    out = tmp_path / "killed"
    kill_after = int(np.random.default_rng().integers(4, 10))  # a random step
    proc = subprocess.Popen([*cmd, "--out", str(out)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len(rows(out)) >= kill_after:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = load_checkpoint(out / "checkpoints" / "last.pt")["step"]
    assert saved % 3 == 0 and saved < 12
    resumed = subprocess.run([*cmd, "--out", str(out), "--resume"], env=ENV, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    losses = [[r["loss"] for r in rows(d) if "loss" in r] for d in (out, tmp_path / "full")]
    assert losses[0] == losses[1]
    a, b = (load_checkpoint(d / "checkpoints" / "last.pt")["model"] for d in (out, tmp_path / "full"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_death_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    cfg = RunConfig.from_dict({"model": {"size": "tiny", "patch": 8}, "data": {"crop": 32}})
    save_checkpoint({"config": cfg.to_dict(), "model": {"w": torch.ones(3)}, "step": 7}, path)

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # the process is stopped mid-write

    monkeypatch.setattr(ctmae.runtime.checkpoint.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"config": cfg.to_dict(), "model": {"w": torch.zeros(3)}, "step": 8}, path)
    assert load_checkpoint(path)["step"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    # A temp file left by a process killed before its rename is ignored by loading.
    (tmp_path / ".last.pt.999.tmp").write_bytes(b"garbage")
    assert load_checkpoint(path)["step"] == 7


_KILLED_MID_WRITE = """
import os, signal, sys
from ctmae.runtime.files import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half of what was being written")
    os.kill(os.getpid(), signal.SIGKILL)  # as a job's grace period ends, or the OOM killer
"""


def _killed_mid_write(path: Path) -> Path:
    """Write ``path`` with ``atomic_path`` in a process that is SIGKILLed mid-write; its temporary file, aged past
    anything a live writer leaves untouched."""
    proc = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, str(path)], env=ENV, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    (left,) = [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
    old = time.time() - 3600
    os.utime(left, (old, old))
    return left


def test_what_a_killed_write_left_is_removed_by_the_next_run_and_a_write_in_progress_is_not(tmp_path, scans):
    """A checkpoint and a cache entry whose writers were SIGKILLed leave hidden temporary files (a base model's is
    a gigabyte); the next run removes them (train.log says so) and keeps one that is still being written."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    common = [str(scans), "--out", str(out), "--cache-dir", str(cache), *TINY]
    assert CliRunner().invoke(app, ["pretrain", *common, "--steps", "2"]).exit_code == 0
    entry = next(cache.glob("*.b2nd"))
    left = [_killed_mid_write(out / "checkpoints" / "last.pt"), _killed_mid_write(entry)]
    fresh = out / "checkpoints" / ".step_0000004.pt.4242.0123abcd.tmp.pt"  # another process writing right now
    fresh.write_bytes(b"in progress")
    result = CliRunner().invoke(app, ["pretrain", *common, "--steps", "4", "--resume"])
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in left) and fresh.exists()
    assert "removed 1 unfinished checkpoint file(s)" in (out / "train.log").read_text(encoding="utf-8")
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 4


class _SlowItems(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1000

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(0.05)
        return torch.zeros(2)


def test_a_loader_worker_dying_during_a_checkpoint_write_is_named_not_the_disk(tmp_path, monkeypatch):
    """torch's SIGCHLD handler raises a dead worker inside torch.save's writer, whose own error would be "unexpected
    pos": the run names the worker, and the previous checkpoint stays."""
    path = tmp_path / "last.pt"
    cfg = RunConfig.from_dict({"model": {"size": "tiny", "patch": 8}, "data": {"crop": 32}}).to_dict()
    save_checkpoint({"config": cfg, "model": {"w": torch.ones(3)}, "step": 7}, path)
    it = iter(torch.utils.data.DataLoader(_SlowItems(), num_workers=1))
    next(it)
    worker = it._workers[0].pid
    real_save = torch.save

    class WorkerDiesMidWrite:  # the checkpoint's file, with the loader worker killed (OOM) after the first bytes
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data) -> int:
            if self.written and worker:
                os.kill(worker, signal.SIGKILL)
                time.sleep(2)  # the SIGCHLD handler runs here, inside torch's writer
            self.written += len(data)
            return self.f.write(data)

        def flush(self) -> None:
            self.f.flush()

    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, WorkerDiesMidWrite(f)))
    try:
        with pytest.raises(LoaderError, match=rf"DataLoader worker \(pid\(?s?\)? {worker}\)? .*killed"):
            save_checkpoint({"config": cfg, "model": {"w": torch.zeros(3)}, "step": 8}, path)
    finally:
        del it
    assert load_checkpoint(path)["step"] == 7


def _nan_after(step_from: int, step_to: int | None = None):
    real = MaskedAutoencoder3D.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        loss, pred, mask = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= step_from and (step_to is None or calls["n"] <= step_to):
            loss = loss * float("nan")
        return loss, pred, mask

    return forward


@pytest.fixture
def tiny_cfg(tmp_path, scans):
    cfg = RunConfig.from_dict(
        {
            "model": {"size": "tiny", "patch": 8, "depth": 2},
            "data": {"crop": 32, "workers": 0, "cache_dir": str(tmp_path / "cache")},
            "train": {"steps": 12, "log_every": 1, "ckpt_every": 2},
        }
    )
    sources, _ = find_volumes([str(scans)])
    return cfg, sources


def test_a_nan_step_is_skipped_and_counted(tmp_path, tiny_cfg, monkeypatch):
    cfg, sources = tiny_cfg
    monkeypatch.setattr(MaskedAutoencoder3D, "forward", _nan_after(3, 3))
    result = pretrain(cfg, sources, tmp_path / "run")
    assert result["skipped_steps"] == 1 and result["stopped"] is None and result["steps"] == 12
    assert all(np.isfinite(r["loss"]) for r in rows(tmp_path / "run"))
    assert "step 3: non-finite loss" in (tmp_path / "run" / "train.log").read_text(encoding="utf-8")


def test_repeated_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_cfg, monkeypatch):
    cfg, sources = tiny_cfg
    monkeypatch.setattr(MaskedAutoencoder3D, "forward", _nan_after(6))
    result = pretrain(cfg, sources, tmp_path / "run")
    assert result["stopped"] == f"{MAX_BAD_STEPS} non-finite losses in a row, the last at step {5 + MAX_BAD_STEPS}"
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 4 and all(torch.isfinite(t).all() for t in state["model"].values())


def test_nan_run_exits_1_with_a_message_naming_the_step(tmp_path, scans, monkeypatch):
    monkeypatch.setattr(MaskedAutoencoder3D, "forward", _nan_after(1))
    result = CliRunner().invoke(
        app,
        [
            "pretrain",
            str(scans),
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "20",
            "--cache-dir",
            str(tmp_path / "c"),
            *TINY,
        ],
    )
    assert result.exit_code == 1 and f"the last at step {MAX_BAD_STEPS}" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte", "drop_sidecar"])
def test_damaged_cache_entries_are_rebuilt(tmp_path, scans, damage):
    cfg = RunConfig.from_dict({"data": {"cache_dir": str(tmp_path / "cache"), "crop": 32}, "model": {"patch": 8}})
    source = find_volumes([str(scans / "scan0.nii.gz")])[0][0]
    entry = VolumeCache(cfg.preprocess).ensure(source)
    good = VolumeCache(cfg.preprocess).load(source).numpy().copy()
    raw = bytearray(entry.read_bytes())
    if damage == "truncate":
        entry.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip_a_byte":
        raw[-100] ^= 0xFF
        entry.write_bytes(raw)
    else:
        entry.with_suffix(".json").unlink()
    again = VolumeCache(cfg.preprocess).load(source).numpy()  # a new process: the checksum is checked once
    assert np.array_equal(again, good)


def test_disk_full_while_checkpointing_is_one_line_and_keeps_earlier_outputs(tmp_path, scans, monkeypatch):
    out = tmp_path / "run"
    common = [str(scans), "--out", str(out), "--cache-dir", str(tmp_path / "c"), *TINY]
    assert CliRunner().invoke(app, ["pretrain", *common, "--steps", "2"]).exit_code == 0

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ctmae.runtime.checkpoint.torch, "save", full)
    result = CliRunner().invoke(app, ["pretrain", *common, "--steps", "4", "--resume"])
    assert result.exit_code == 1 and "No space left on device" in result.output
    assert "Traceback" not in result.output
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 2
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 64 MiB file system (tmpfs) to fill up; needs root, as CI and the developers' machines run."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` until only ``leave`` bytes are free (tmpfs frees a deleted file's pages at once)."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_a_really_full_disk_while_checkpointing_and_reconstructing_is_one_line(tmp_path, scans, tiny_disk):
    """torch's zip writer reports a full disk as 'RuntimeError: [enforce fail at inline_container.cc] unexpected
    pos'; ctmae names the file and the full disk, exits 1 and keeps the earlier checkpoint."""
    out = tiny_disk / "run"
    common = [str(scans), "--out", str(out), "--cache-dir", str(tmp_path / "c"), *TINY]
    assert CliRunner().invoke(app, ["pretrain", *common, "--steps", "2"]).exit_code == 0
    last = out / "checkpoints" / "last.pt"
    fill(tiny_disk, leave=last.stat().st_size // 2)
    result = CliRunner().invoke(app, ["pretrain", *common, "--steps", "4", "--resume"])
    assert result.exit_code == 1, result.output
    assert f"{last}: could not write (No space left on device)" in " ".join(result.output.split())
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert load_checkpoint(last)["step"] == 2

    (tiny_disk / "filler").unlink()
    fill(tiny_disk, leave=4096)  # room for a little, not for the NIfTIs
    scan = str(next(scans.iterdir()))
    result = CliRunner().invoke(app, ["reconstruct", str(last), scan, "--out", str(tiny_disk / "recon")])
    assert result.exit_code == 1
    assert "could not write (No space left on device)" in " ".join(result.output.split())
    assert str(tiny_disk / "recon") in " ".join(result.output.split())
    assert "Traceback" not in result.output
