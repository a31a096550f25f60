"""Stop signals as a cluster and a terminal send them: to the whole process group, data-loader workers included.

SLURM, ``timeout`` and Ctrl-C signal every process of the job. Each test starts ctmae in a session of its own and
signals that process group, with data-loader workers running, the way those tools do: during training steps, and
inside long work (a validation, a prediction, an evaluation), which stops between sliding windows.
"""

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
from monai.inferers import sliding_window_inference

from conftest import write_body_scans, write_volume
from ctmae.mae.checkpoint import load_checkpoint
from ctmae.runtime.signals import StopFlag, Stopped
from ctmae.runtime.windows import watch, window_count
from ctmae.seg.network import load_seg_checkpoint

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


@pytest.mark.slow
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


# --- stops inside long work: validation, prediction, evaluation, between sliding windows ----------------------------


def seg_case(root: Path, name: str, size: int, seed: int) -> None:
    """A cube of tissue in air holding a labelled brighter cube: images/<name>.nii.gz and labels/<name>.nii.gz."""
    rng = np.random.default_rng(seed)
    ct = np.full((size,) * 3, -1000.0)
    ct[3:-3, 3:-3, 3:-3] = 40 + rng.normal(0, 10, (size - 6,) * 3)
    label = np.zeros((size,) * 3)
    c = size // 2
    label[c - 5 : c + 5, c - 5 : c + 5, c - 5 : c + 5] = 1
    ct[label > 0] = 200
    write_volume(root / "images" / f"{name}.nii.gz", ct, spacing=(1.5,) * 3)
    write_volume(root / "labels" / f"{name}.nii.gz", label, spacing=(1.5,) * 3, dtype=np.uint8)


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Wait until ``path`` holds ``text`` (a line the command logs when the long work begins)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if path.is_file() and text in path.read_text(encoding="utf-8"):
            return
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"{text!r} did not appear in {path} in time")


def timed_stop(proc: subprocess.Popen, sig: int) -> tuple[int, str, str, float]:
    """Signal the process group; (exit code, stdout, stderr, seconds from the signal to the exit)."""
    sent = time.monotonic()
    code, out, err = signal_group(proc, sig)
    return code, out, err, time.monotonic() - sent


SECONDS = 20  # a stop ends within a window or two (about a second each here), plus writing the checkpoint


@pytest.fixture(scope="module")
def stopped_validation(tmp_path_factory) -> dict:
    """finetune-seg validating on an 80³ volume (27 windows of 32³, many seconds on a CPU), SIGTERM to the group as
    soon as train.log says the validation began."""
    root = tmp_path_factory.mktemp("seg")
    for i in range(2):
        seg_case(root / "train", f"case{i}", 40, i)
    seg_case(root / "val", "big", 80, 9)
    run_dir = root / "run"
    cmd = ["finetune-seg", "--from-scratch", "--model", "tiny", "--crop", "32", "--feature-size", "8"]
    cmd += ["--images", str(root / "train" / "images"), "--labels", str(root / "train" / "labels")]
    cmd += ["--val-images", str(root / "val" / "images"), "--val-labels", str(root / "val" / "labels")]
    cmd += ["--out", str(run_dir), "--steps", "100000", "--val-every", "2", "--workers", "2"]
    cmd += ["--cache-dir", str(root / "cache"), "--device", "cpu"]
    proc = start(cmd)
    wait_for_text(run_dir / "train.log", "step 2: validating on 1 case(s)", proc)
    code, out, err, seconds = timed_stop(proc, signal.SIGTERM)
    return {"root": root, "run_dir": run_dir, "code": code, "out": out, "err": err, "seconds": seconds}


@pytest.mark.slow
def test_sigterm_during_validation_keeps_the_step_and_exits_within_seconds(stopped_validation):
    s, run_dir = stopped_validation, stopped_validation["run_dir"]
    assert s["code"] == 0, s["err"]
    assert s["seconds"] < SECONDS, s["seconds"]
    assert "stopped early: stop signal (SIGTERM) after step 2" in s["err"]
    assert "Traceback" not in s["err"] + s["out"] and "killed by signal" not in s["err"]
    log = (run_dir / "train.log").read_text(encoding="utf-8")
    assert "step 2: validation stopped by SIGTERM, not scored" in log and "stopped: stop signal (SIGTERM)" in log
    state = load_seg_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 2 and state["val_dice"] is None  # the last finished step, no half-done Dice
    assert not (run_dir / "checkpoints" / "best.pt").exists()
    assert "val_dice" not in (run_dir / "metrics.jsonl").read_text(encoding="utf-8")


@pytest.mark.slow
def test_ctrl_c_during_prediction_keeps_finished_volumes_and_exits_130(stopped_validation, tmp_path):
    """Two scans to segment; Ctrl-C to the group once the first is written lands in the second's windows."""
    root = stopped_validation["root"]
    small, big = root / "train" / "images" / "case0.nii.gz", root / "val" / "images" / "big.nii.gz"
    checkpoint = stopped_validation["run_dir"] / "checkpoints" / "last.pt"
    pred = tmp_path / "pred"
    proc = start(["finetune-seg", "--predict", str(checkpoint), str(small), str(big), "--out", str(pred)])
    for line in proc.stdout:  # "case0.nii.gz -> .../case0.nii.gz  voxels per class [...]" once it is written
        if "->" in line:
            break
    else:
        raise AssertionError(proc.communicate())
    code, out, err, seconds = timed_stop(proc, signal.SIGINT)
    assert code == 130, err
    assert seconds < SECONDS, seconds
    assert "Ctrl-C: stopping after this window" in err
    assert f"stopped early: stop signal (SIGINT); 1 of 2 label volume(s) written to {pred}" in " ".join(err.split())
    names = sorted(p.name for p in pred.iterdir())  # the first mask and its class-names sidecar; nothing of the second
    assert names == ["train__images__case0.json", "train__images__case0.nii.gz"]
    assert "Traceback" not in err + out


@pytest.mark.slow
def test_sigterm_during_evaluation_keeps_the_journal_and_the_few_shot_checkpoint(tiny_checkpoint, tmp_path):
    """evaluate's few-shot unit validates on an 80³ test case; SIGTERM in that validation ends the evaluation."""
    data = tmp_path / "cases"
    for i in range(3):
        seg_case(data, f"case{i}", 80, i)
    out = tmp_path / "report"
    cmd = ["evaluate", str(tiny_checkpoint), "--images", str(data / "images"), "--labels", str(data / "labels")]
    cmd += ["--out", str(out), "--protocols", "fewshot", "--shots", "1", "--repeats", "1", "--steps", "1"]
    cmd += ["--crop", "32", "--feature-size", "8", "--device", "cpu"]
    proc = start(cmd)
    run_dir = out / "fewshot" / "ckpt0" / "k1_r0"
    wait_for_text(run_dir / "train.log", "step 1: validating on 1 case(s)", proc)
    code, out_text, err, seconds = timed_stop(proc, signal.SIGTERM)
    assert code == 0, err
    assert seconds < SECONDS, seconds
    assert "stopped early: stop signal (SIGTERM) after step 1; finished units are kept" in " ".join(err.split())
    assert "Traceback" not in err + out_text
    journal = (out / "journal.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(journal) == 1 and json.loads(journal[0])["journal"]  # the header; the cut unit is not recorded
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["units_done"] == 0
    assert load_seg_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 1  # kept for --resume


@pytest.mark.parametrize(
    ("size", "roi", "overlap"), [((40, 33, 20), (16, 16, 16), 0.25), ((64, 64, 64), (32,) * 3, 0.5)]
)
def test_window_count_and_progress_follow_the_windows_monai_runs(size, roi, overlap):
    total, heard, batches = window_count(size, roi, overlap), [], []

    def predictor(windows):
        batches.append(len(windows))
        return windows

    image = torch.rand(1, 1, *size)
    out = sliding_window_inference(image, roi, 3, watch(predictor, total, lambda *a: heard.append(a)), overlap=overlap)
    assert torch.allclose(out, image)  # the watch passes the predictor's output through
    assert sum(batches) == total and heard[-1] == (total, total) and len(heard) == len(batches)


def test_a_stop_signal_ends_sliding_windows_before_the_next_batch():
    calls = []

    def predictor(windows):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as the cluster's stop arriving in the second batch
        return windows

    total = window_count((48, 48, 48), (16, 16, 16), 0.0)  # 27 windows, one per batch
    with StopFlag(), pytest.raises(Stopped) as stopped:
        sliding_window_inference(torch.rand(1, 1, 48, 48, 48), (16,) * 3, 1, watch(predictor, total), overlap=0.0)
    assert stopped.value.signal == "SIGTERM" and len(calls) == 2
