"""`ctmae study`: grid parsing (aliases, coercion, bad keys and values named), the >12-point guard, a 2-point study
end to end (study.md/json/png, one row per point), skipping finished points on a re-run, --point and --report, a
folder of another study refused, and a failing point recorded while the other completes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from conftest import write_body_scans, write_volume
from ctmae.cli import app
from ctmae.experiments.study import GridError, load_grid_file, parse_grid, plan_points
from ctmae.experiments.study.report import ranking
from ctmae.mae.config import RunConfig

runner = CliRunner()
IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)
ISO = (1.5, 1.5, 1.5)
TINY = RunConfig.from_dict({"model": {"size": "tiny", "patch": 8}, "data": {"crop": 32}})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Training scans (scans/) and three labelled 40³ cases (images/, labels/): bright cubes labelled 1."""
    root = tmp_path_factory.mktemp("study")
    write_body_scans(root / "scans", 2)
    rng = np.random.default_rng(0)
    for i in range(3):
        image = rng.normal(0.0, 20.0, (40, 40, 40))
        label = np.zeros((40, 40, 40), np.uint8)
        for _ in range(3):
            a = rng.integers(0, 28, 3)
            image[a[0] : a[0] + 12, a[1] : a[1] + 12, a[2] : a[2] + 12] += 300
            label[a[0] : a[0] + 12, a[1] : a[1] + 12, a[2] : a[2] + 12] = 1
        write_volume(root / "images" / f"case{i}.nii.gz", image, spacing=ISO, direction=IDENTITY)
        write_volume(root / "labels" / f"case{i}.nii.gz", label, dtype=np.uint8, spacing=ISO, direction=IDENTITY)
    return root


def _study(data: Path, out: Path, *extra: str, grid: tuple[str, ...] = ("mask=random,block",)):
    args = ["study", str(data / "scans"), "--eval-images", str(data / "images"), "--eval-labels", str(data / "labels")]
    args += ["--out", str(out), "--steps", "3", "--model", "tiny", "--crop", "32", "--patch", "8", "--device", "cpu"]
    args += ["--workers", "0", "--cache-dir", str(data / "cache"), "--protocols", "probe,recon", "--windows", "1"]
    args += ["--test-cases", "1"]
    for g in grid:
        args += ["--grid", g]
    return runner.invoke(app, [*args, *extra])


# --- the grid -------------------------------------------------------------------------------------------------


def test_grid_aliases_and_coercion():
    grid = parse_grid(["mask=none,block", "mask_ratio=0.5,0.75", "model.dec_depth=1,2", "data.spacing=2"])
    assert grid == {
        "mask.kind": ["none", "block"],
        "mask.ratio": [0.5, 0.75],
        "model.dec_depth": [1, 2],
        "preprocess.spacing": [[2, 2, 2]],  # the flat layout's name for it
    }
    points = plan_points(grid, TINY)
    # none ignores the ratio: its two ratios are one experiment
    assert [p.cfg.mask.kind for p in points] == ["none", "none", "block", "block", "block", "block"]
    assert points[2].cfg.mask.ratio == 0.5 and points[3].cfg.model.dec_depth == 2
    assert points[0].cfg.preprocess.spacing == (2.0, 2.0, 2.0)
    assert len({p.folder for p in points}) == len(points)


def test_grid_file(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("mask: [random, block]\nblock: 3\n", encoding="utf-8")
    assert load_grid_file(path) == {"mask.kind": ["random", "block"], "mask.block": [3]}


@pytest.mark.parametrize(
    ("option", "named"),
    [
        (["colour=red"], "'colour'"),
        (["mask=zebra"], "zebra"),
        (["block=x"], "mask.block"),
        (["mask_ratio=1.5"], "1.5"),
        (["train.seed=1,2"], "train.seed"),
        (["mask"], "KEY=V1,V2"),
    ],
)
def test_bad_grid_named(option, named):
    with pytest.raises(GridError, match=named):
        plan_points(parse_grid(option), TINY)


def test_bad_grid_on_the_command_line(data, tmp_path):
    result = _study(data, tmp_path / "s", grid=("mask=zebra",))
    assert result.exit_code == 2 and "zebra" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s").exists()


def test_large_grid_needs_yes(data, tmp_path):
    result = _study(data, tmp_path / "s", grid=("mask=random,block", "mask_ratio=0.3,0.5,0.6,0.75,0.8,0.9,0.95"))
    assert result.exit_code == 2 and "14 points" in result.output and "--yes" in result.output


def test_ranking_line():
    def row(mask, dice):
        return {"status": "done", "mask": mask, "figures": {"probe_dice": dice}}

    assert ranking([row("block", 0.5), row("random", 0.4), row("none", 0.3)])["agrees"] is True
    assert ranking([row("block", 0.3), row("random", 0.4), row("noise", 0.2)])["agrees"] is False
    assert ranking([row("block", 0.3)])["agrees"] is None


def test_report_flags_and_ranking_from_status_files(tmp_path):
    from ctmae.experiments.evaluate import EvalSettings
    from ctmae.experiments.study import gather, manifest

    grid = parse_grid(["mask=none,random,block", "dec_depth=1,4"])
    points = plan_points(grid, TINY)
    figures = {  # block reconstructs well but its probe sits at the floor with the deep decoder
        "000-none-dd1": {"probe_dice": 0.20, "probe_floor": 0.25, "psnr_gain": -1.0},
        "002-random-dd1": {"probe_dice": 0.40, "probe_floor": 0.25, "psnr_gain": 0.5},
        "004-block-dd1": {"probe_dice": 0.50, "probe_floor": 0.25, "psnr_gain": 1.0},
        "005-block-dd4": {"probe_dice": 0.25, "probe_floor": 0.25, "psnr_gain": 2.0},
    }
    for p in points:
        folder = tmp_path / "points" / p.folder
        folder.mkdir(parents=True)
        if p.folder == "001-none-dd4":
            status = {"status": "failed", "reason": "RuntimeError: out of memory"}
        elif p.folder in figures:
            status = {"status": "done", "figures": {"final_loss": 0.1, **figures[p.folder]}}
        else:
            continue
        (folder / "status.json").write_text(json.dumps(status), encoding="utf-8")
    study = gather(tmp_path, points, manifest([tmp_path], [tmp_path], grid, TINY, EvalSettings()))
    assert study["ranking"]["agrees"] is True and study["done"] == 4 and study["failed"] == 1
    md = (tmp_path / "study.md").read_text(encoding="utf-8")
    assert "block 0.500 > random 0.400 > none 0.200; this agrees" in md
    assert "005-block-dd4: reconstruction beats the best trivial fill" in md
    assert md.count("decoder may be doing the work") == 3  # the row, the line, how to read
    assert "001-none-dd4 failed: RuntimeError: out of memory" in md
    assert "| 003-random-dd4 | random | 0.75 | – | 4 | pending |" in md
    assert sitk.ReadImage(str(tmp_path / "study.png")).GetSize()[0] > 1000


# --- running ----------------------------------------------------------------------------------------------------


def _statuses(out: Path) -> dict[str, dict]:
    return {
        p.parent.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted((out / "points").glob("*/status.json"))
    }


@pytest.mark.slow
def test_study_end_to_end_and_rerun(data, tmp_path):
    out = tmp_path / "s"
    result = _study(data, out)
    assert result.exit_code == 0, result.output
    statuses = _statuses(out)
    assert list(statuses) == ["000-random", "001-block"]
    assert all(s["status"] == "done" for s in statuses.values())
    study = json.loads((out / "study.json").read_text(encoding="utf-8"))
    assert [r["mask"] for r in study["points"]] == ["random", "block"]
    f = study["points"][1]["figures"]
    assert 0.0 <= f["probe_dice"] <= 1.0 and 0.0 <= f["probe_floor"] <= 1.0 and f["masked_psnr"] is not None
    assert np.isfinite(f["final_loss"])
    md = (out / "study.md").read_text(encoding="utf-8")
    assert "| 000-random | random |" in md and "| 001-block | block |" in md and "Ranking" in md
    assert sitk.ReadImage(str(out / "study.png")).GetNumberOfComponentsPerPixel() == 3
    assert (out / "points" / "001-block" / "eval" / "report.json").is_file()

    mtimes = {p: p.stat().st_mtime_ns for p in (out / "points").glob("*/status.json")}
    again = _study(data, out)
    assert again.exit_code == 0, again.output
    assert "000-random: skip" in again.output and "001-block: skip" in again.output
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes

    other = _study(data, out, grid=("mask=random,noise",))  # another grid into the same folder
    assert other.exit_code == 2 and "other grid" in other.output
    assert _study(data, out, "--overwrite", grid=("mask=noise",)).exit_code == 0
    assert list(_statuses(out)) == ["000-noise"]


@pytest.mark.slow
def test_one_point_then_report(data, tmp_path):
    out = tmp_path / "s"
    result = _study(data, out, "--point", "1")
    assert result.exit_code == 0, result.output
    assert list(_statuses(out)) == ["001-block"]
    study = json.loads((out / "study.json").read_text(encoding="utf-8"))
    assert [r["status"] for r in study["points"]] == ["pending", "done"]

    (out / "study.md").unlink()
    gathered = runner.invoke(app, ["study", "--report", "--out", str(out)])
    assert gathered.exit_code == 0, gathered.output
    assert "1 of 2 point(s) done" in gathered.output
    assert "| 000-random | random |" in (out / "study.md").read_text(encoding="utf-8")

    assert _study(data, out, "--point", "2").exit_code == 2


@pytest.mark.slow
def test_failed_point_recorded_and_others_go_on(data, tmp_path):
    # 0.99 of 64 tokens leaves 1 visible: the config accepts it, pretraining refuses it
    out = tmp_path / "s"
    result = _study(data, out, grid=("mask=block", "mask_ratio=0.99,0.5"))
    assert result.exit_code == 1
    statuses = _statuses(out)
    failed, done = statuses["000-block-r0.99"], statuses["001-block-r0.5"]
    assert failed["status"] == "failed" and "visible" in failed["reason"]
    assert done["status"] == "done"
    assert "failed: ValueError: mask ratio 0.99" in (out / "study.md").read_text(encoding="utf-8")
    # a re-run tries the failed point again and skips the finished one
    again = _study(data, out, grid=("mask=block", "mask_ratio=0.99,0.5")).output
    assert "000-block-r0.99: failed" in again and "001-block-r0.5: skip" in again


@pytest.mark.slow
def test_stop_signal_leaves_the_point_resumable(data, tmp_path, monkeypatch):
    import ctmae.mae.train as train

    real = train.pretrain

    def pretrain_then_sigterm(*args, **kwargs):
        on_step = kwargs["on_step"]

        def stepped(info):
            on_step(info)
            if info["step"] == 2:
                os.kill(os.getpid(), signal.SIGTERM)

        return real(*args, **{**kwargs, "on_step": stepped})

    out = tmp_path / "s"
    monkeypatch.setattr(train, "pretrain", pretrain_then_sigterm)
    stopped = _study(data, out)
    assert stopped.exit_code == 0 and "stopped early" in stopped.output and "SIGTERM" in stopped.output
    assert _statuses(out) == {}  # the point is unfinished, not failed
    assert (out / "points" / "000-random" / "run" / "checkpoints" / "last.pt").is_file()
    monkeypatch.setattr(train, "pretrain", real)
    resumed = _study(data, out)
    assert resumed.exit_code == 0, resumed.output
    assert [s["status"] for s in _statuses(out).values()] == ["done", "done"]
    assert _statuses(out)["000-random"]["figures"]["pretrain_steps"] == 3


def test_other_folder_refused(data, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    result = _study(data, out)
    assert result.exit_code == 2 and "holds no study" in result.output
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_report_without_a_study(tmp_path):
    result = runner.invoke(app, ["study", "--report", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no study.json" in result.output
