"""`ctmae pretrain` end to end on real files: run folder contents, exact resume, refusals and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import write_volume
from ctmae.cli import app
from ctmae.mae.checkpoint import load_checkpoint
from ctmae.mae.config import RunConfig, recipe_path

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
FAST = ["--model", "tiny", "--crop", "32", "--patch", "8", "--batch-size", "2", "--workers", "0"]


def run(*args: str):
    return CliRunner().invoke(app, ["pretrain", *map(str, args)])


def losses(run_dir: Path) -> list[float]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines())
    return [r["loss"] for r in rows if "loss" in r]  # preview and probe rows carry other figures


@pytest.fixture
def every_step(tmp_path) -> Path:
    path = tmp_path / "log_every_step.yaml"
    path.write_text("train:\n  log_every: 1\n  ckpt_every: 4\n", encoding="utf-8")
    return path


def test_pretrain_on_sample_data_writes_the_run_folder(tmp_path, every_step):
    out = tmp_path / "run"
    args = ["--steps", "6", "--cache-dir", tmp_path / "cache", "--config", every_step, "--predict-ratio", "0.5"]
    result = run("--out", out, *args, *FAST)
    assert result.exit_code == 0, result.output
    assert "pretraining summary" in result.output
    cfg = (out / "config.yaml").read_text(encoding="utf-8")
    assert (
        "predict_ratio: 0.5" in cfg
        and "steps: 6" in cfg
        and "size: tiny" in cfg
        and "device: cpu" in cfg
        and "precision: fp32" in cfg
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if "loss" in r]  # a preview row at the checkpoint carries other figures
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all({"step", "loss", "lr", "seconds"} <= set(r) and np.isfinite(r["loss"]) for r in rows)
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "checkpoints" / "step_0000004.pt").is_file()
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == 6 and state["config"].model.size == "tiny"
    assert {"model", "optimizer", "scaler", "rng"} <= set(state)
    assert "checkpoint written to" in (out / "train.log").read_text(encoding="utf-8")
    # the demo's two scans (the lower slabs of lung1 and of the abdomen), cached
    assert len(list((tmp_path / "cache").glob("*.b2nd"))) == 2


@pytest.mark.slow  # 24 s on 2 idle cores
def test_resume_continues_exactly(tmp_path, every_step):
    common = ["--steps", "12", "--cache-dir", tmp_path / "cache", "--config", every_step, "--mask", "block", *FAST]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run("--out", full, *common).exit_code == 0
    first = run("--out", part, *common, "--stop-at", "5")
    assert first.exit_code == 0, first.output
    assert load_checkpoint(part / "checkpoints" / "last.pt")["step"] == 5
    second = run("--out", part, *common, "--resume")
    assert second.exit_code == 0, second.output
    assert losses(part) == losses(full) and len(losses(full)) == 12
    a, b = (load_checkpoint(d / "checkpoints" / "last.pt")["model"] for d in (full, part))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_checkpoint_starts_fresh_and_overwrite_replaces(tmp_path):
    out = tmp_path / "run"
    assert run("--out", out, "--steps", "2", "--cache-dir", tmp_path / "c", "--resume", *FAST).exit_code == 0
    refused = run("--out", out, "--steps", "2", "--cache-dir", tmp_path / "c", *FAST)
    assert refused.exit_code == 2 and "not empty" in refused.output and "--resume" in refused.output
    assert run("--out", out, "--steps", "3", "--cache-dir", tmp_path / "c", "--overwrite", *FAST).exit_code == 0
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 3


def test_demo_loss_falls(tmp_path):
    """The README demo's settings (tiny model, sample data) learn: late losses are below early ones. The demo's
    decoder starts as a gaussian fill of the visible voxels (a zero residual), so its first loss is already the
    fill's; 40 steps take it 14% below that."""
    out = tmp_path / "demo"
    result = run("--out", out, "--cache-dir", tmp_path / "cache", "--steps", "40", "--workers", "0")
    assert result.exit_code == 0, result.output
    rows = losses(out)
    assert rows[-1] < 0.9 * rows[0]


def test_bad_inputs_are_skipped_and_reported(tmp_path):
    good = write_volume(
        tmp_path / "scans" / "good.nii.gz", np.random.default_rng(0).integers(-1000, 1000, (40, 40, 40))
    )
    (tmp_path / "scans" / "broken.nii.gz").write_bytes(b"not an image")
    missing = tmp_path / "nope.nii.gz"
    result = run(
        tmp_path / "scans", missing, "--out", tmp_path / "run", "--steps", "1", "--cache-dir", tmp_path / "c", *FAST
    )
    assert result.exit_code == 0, result.output
    assert "broken.nii.gz" in result.output and str(missing) in result.output and "2 skipped" in result.output
    assert "Traceback" not in result.output and good.is_file()


@pytest.mark.parametrize("make", ["missing", "empty_dir", "text", "2d"])
def test_no_usable_input_exits_1_with_one_line(tmp_path, make):
    target = tmp_path / "in"
    if make == "empty_dir":
        target.mkdir()
    elif make == "text":
        target = tmp_path / "scan.nii.gz"
        target.write_text("hello", encoding="utf-8")
    elif make == "2d":
        target = write_volume(tmp_path / "flat.nrrd", np.zeros((30, 30, 1)))
    result = run(target, "--out", tmp_path / "run", "--steps", "1", "--cache-dir", tmp_path / "c", *FAST)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and target.name in result.output


def test_usage_errors_exit_2(tmp_path):
    result = run("--out", tmp_path / "run", "--mask", "blobs", *FAST)
    assert result.exit_code == 2 and "blobs" in result.output
    zero = run("--out", tmp_path / "run", "--predict-ratio", "0", *FAST)
    assert zero.exit_code == 2 and "predict_ratio must be in (0, 1], got 0.0" in zero.output
    needs_out = run(str(SAMPLE / "ct"), "--steps", "1")
    assert needs_out.exit_code == 2 and "--out RUN_DIR is required" in needs_out.output


def test_no_arguments_runs_the_demo_into_runs_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    result = run("--steps", "2", "--workers", "0")  # the demo, shortened
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "demo" / "checkpoints" / "last.pt").is_file()
    # the demo pretrains on the lower slabs of lung1 (32 slices) and of the abdomen (82): both upper slabs stay held
    # out for reconstruct and the organ probe
    sizes = [json.loads(f.read_text(encoding="utf-8"))["source"]["size"] for f in (tmp_path / "cache").rglob("*.json")]
    assert sorted(sizes) == [[122, 101, 82], [195, 195, 32]]
    ran = RunConfig.load_yaml(tmp_path / "runs" / "demo" / "config.yaml")  # the shipped recipe, as the options say
    demo = RunConfig.load_yaml(recipe_path("demo")).replace(train={"steps": 2}, data={"workers": 0})
    resolved = {"device": ran.train.device, "precision": ran.train.precision}  # auto, as this machine resolved it
    assert ran == demo.replace(preprocess={"cache_dir": str(tmp_path / "cache" / "ctmae")}, train=resolved)
    again = run("--steps", "2")
    assert again.exit_code == 2 and "runs/demo" in again.output and "--overwrite" in again.output


def test_resume_with_other_model_sizes_is_refused_in_one_line(tmp_path):
    out = tmp_path / "run"
    assert run("--out", out, "--steps", "2", "--cache-dir", tmp_path / "c", *FAST).exit_code == 0
    other_patch = [("16" if prev == "--patch" else a) for prev, a in zip(["", *FAST], FAST)]  # 8³ -> 16³ patches
    result = run("--out", out, "--steps", "4", "--cache-dir", tmp_path / "c", *other_patch, "--resume")
    assert result.exit_code == 1 and "does not fit the requested sizes" in result.output
    assert "Traceback" not in result.output and load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 2


def test_the_progress_rate_is_the_run_s_own_crops_per_second(tmp_path):
    """The progress bar shows what the loop measures for all ranks (metrics.jsonl's figure), not a per-process guess."""
    from conftest import write_body_scans
    from ctmae.io.discovery import find_volumes
    from ctmae.mae.config import RunConfig
    from ctmae.mae.train import pretrain
    from ctmae.preprocess.build_cache import build_cache

    cfg = RunConfig.from_dict(
        {
            "model": {"size": "tiny", "patch": 8},
            "data": {"crop": 32, "cache_dir": str(tmp_path / "c"), "workers": 0},
            "train": {"steps": 3, "batch_size": 2, "device": "cpu", "log_every": 1},
        }
    )
    sources, _ = build_cache(find_volumes([str(write_body_scans(tmp_path / "s", 1))])[0], cfg.preprocess)
    seen = []
    result = pretrain(cfg, sources, tmp_path / "run", on_step=seen.append)
    assert [s["step"] for s in seen] == [1, 2, 3] and all(s["crops_per_s"] > 0 for s in seen)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text("utf-8").splitlines()]
    assert [round(s["crops_per_s"], 3) for s in seen] == [row["crops_per_s"] for row in logged]  # metrics.jsonl's
    assert result["crops_per_s"] <= seen[-1]["crops_per_s"]  # the summary also counts the last checkpoint's time


@pytest.mark.parametrize("command", ["pretrain", "finetune-seg"])
def test_steps_and_epochs_together_are_refused_before_any_work(tmp_path, command):
    out = tmp_path / "run"
    args = [command, str(tmp_path / "scans"), "--out", str(out), "--steps", "10", "--epochs", "1"]
    if command == "finetune-seg":
        args += ["--from-scratch", "--images", str(tmp_path / "images")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "error: --steps 10 and --epochs 1 both set the run's length; give one of them" in text, text
    assert not out.exists()
