"""Distribution shift: every checkpoint stores the training scans' encoder-feature statistics; a scan unlike them
scores high, a held-out chest does not. No real head or abdomen CT ships with the project: the ranking test trains on
synthetic chest-like torsos and scores an abdomen-like torso and a skull-and-brain phantom against held-out ones."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import SpatialPad
from test_signals import signal_group, start, wait_for_training
from typer.testing import CliRunner

from conftest import write_body_scans, write_volume
from ctmae.cli import app
from ctmae.io.discovery import find_volumes
from ctmae.mae.checkpoint import load_checkpoint, model_from_checkpoint
from ctmae.mae.config import RunConfig
from ctmae.mae.model import build_model
from ctmae.mae.shift import KIND, WARN_SCORE, has_reference, reference, scan_crops, shift_score, shift_warning
from ctmae.mae.train import pretrain
from ctmae.preprocess.build_cache import build_cache
from ctmae.preprocess.transforms import preprocess_transforms
from ctmae.runtime.checkpoint import save_checkpoint

DEMO = Path(__file__).resolve().parents[1] / "sample_data" / "demo"
AXIS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
SMALL = "--model tiny --crop 32 --patch 16 --batch-size 2 --workers 0 --preview-every 0".split()


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(RunConfig.from_dict({"model": {"size": "tiny"}, "data": {"crop": 32}}).model)


def head_phantom(path: Path) -> Path:
    """A small head: air, a skull shell at 1000 HU, brain at 35 HU, in 2 mm voxels."""
    x, y, z = np.mgrid[0:80, 0:95, 0:75].astype(np.float32)
    r = np.sqrt(((x - 40) / 35) ** 2 + ((y - 47) / 42) ** 2 + ((z - 37) / 32) ** 2)
    ct = np.where(r < 1.0, 1000.0, -1000.0)
    ct[r < 0.85] = 35.0
    return write_volume(path, ct, spacing=(2.0, 2.0, 2.0), direction=AXIS)


def test_the_reference_holds_feature_statistics_and_a_training_scan_scores_below_one():
    model, rng = tiny_model(), np.random.default_rng(0)
    scans = [torch.from_numpy(rng.uniform(0.3, 0.7, (40, 36, 34)).astype(np.float32)) for _ in range(3)]
    ref = reference(model, scans, 32)
    d = model.cfg.dim
    assert ref["kind"] == KIND and ref["mean"].shape == (d,) and ref["precision"].shape == (d, d)
    assert len(ref["left_out"]) == 3 and ref["distance"] == pytest.approx(np.mean(ref["left_out"]))
    assert torch.linalg.eigvalsh(ref["precision"].double()).min() > 0  # the shrunk covariance is invertible
    scores = [shift_score(model, s, ref) for s in scans]
    assert all(0 <= s < 1 for s in scores) and scores[0] == shift_score(model, scans[0], ref)
    air = torch.zeros(40, 36, 34)
    assert shift_score(model, air, ref) > WARN_SCORE


def test_a_single_training_scans_lower_and_upper_crops_stand_in_for_two_scans():
    model = tiny_model()
    ref = reference(model, [torch.rand(48, 40, 36)], 32)
    assert ref["scans"] == 1 and len(ref["left_out"]) == 2 and ref["distance"] > 0


def test_warning_names_the_scan_the_score_and_the_threshold():
    line = shift_warning("a.nii.gz", WARN_SCORE + 0.5)
    assert line.startswith(f"a.nii.gz: shift score {WARN_SCORE + 0.5:.1f} (warning above {WARN_SCORE:g})")
    assert shift_warning("a.nii.gz", WARN_SCORE) is None


@pytest.mark.parametrize("ref", [None, {}, {"errors": [0.1, 0.2], "mean": 0.15, "std": 0.05, "seed": 1}])
def test_older_references_are_not_scored_against(ref):
    assert not has_reference(ref)


def test_scan_crops_are_fixed_and_padded_as_preprocessing_pads():
    """reconstruct scores the scan before padding, embed and the training cache after it: the same crops."""
    volume = torch.rand(21, 40, 50) + 0.1
    a, b = scan_crops(volume, 32), scan_crops(volume.numpy(), 32)
    assert a.shape == (8, 1, 32, 32, 32) and torch.equal(a, b)
    assert (a[:, 0, :5] == 0).all() and (a[:, 0, 26:] == 0).all() and (a[:, 0, 5:26] > 0).all()
    padded = SpatialPad((32, 32, 32))(volume[None])[0]  # (32, 40, 50)
    assert torch.equal(scan_crops(padded, 32), a)


def _reconstruct(checkpoint: Path, scan: Path, out: Path):
    result = CliRunner().invoke(app, ["reconstruct", str(checkpoint), str(scan), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))["shift"], " ".join(result.output.split())


def test_periodic_and_stop_at_checkpoints_carry_the_reference_and_reconstruct_scores(tmp_path):
    scans = write_body_scans(tmp_path / "scans", 2)
    every = tmp_path / "every.yaml"
    every.write_text("train:\n  ckpt_every: 1\n", encoding="utf-8")
    run = tmp_path / "run"
    args = ["pretrain", str(scans), "--out", str(run), "--steps", "50", "--stop-at", "2", "--config", str(every)]
    result = CliRunner().invoke(app, [*args, "--cache-dir", str(tmp_path / "cache"), *SMALL])
    assert result.exit_code == 0, result.output
    for name in ("step_0000001.pt", "last.pt"):  # a periodic checkpoint, and the one --stop-at ends with
        assert has_reference(load_checkpoint(run / "checkpoints" / name)["shift_reference"]), name
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2
    shift, output = _reconstruct(run / "checkpoints" / "last.pt", scans / "scan0.nii.gz", tmp_path / "r")
    assert isinstance(shift["shift_score"], float) and shift["threshold"] == WARN_SCORE and shift["note"] is None
    assert f"shift score {shift['shift_score']:.1f} (warning above {WARN_SCORE:g})" in output


@pytest.mark.slow  # a ctmae process started, trained and stopped
def test_a_sigterm_checkpoint_carries_the_reference_and_reconstruct_scores(tmp_path):
    scans = write_body_scans(tmp_path / "scans", 2)
    run = tmp_path / "run"
    cmd = ["pretrain", str(scans), "--out", str(run), "--steps", "100000", "--cache-dir", str(tmp_path / "cache")]
    proc = start([*cmd, *SMALL])
    wait_for_training(run, proc)
    code, out, err = signal_group(proc, signal.SIGTERM)
    assert code == 0 and "stop signal (SIGTERM)" in err, err
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert 0 < state["step"] < 100000 and has_reference(state["shift_reference"])
    shift, output = _reconstruct(run / "checkpoints" / "last.pt", scans / "scan1.nii.gz", tmp_path / "r")
    assert isinstance(shift["shift_score"], float) and "shift score" in output


@pytest.mark.parametrize("stored", ["none", "older kind"])
def test_a_checkpoint_without_a_reference_of_this_kind_says_so_once(tiny_checkpoint, tmp_path, stored):
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    if stored == "none":
        del state["shift_reference"]
    else:
        state["shift_reference"] = {"errors": [0.01], "mean": 0.01, "std": 0.0, "seed": 1, "crops_per_scan": 4}
    older = tmp_path / "older.pt"
    save_checkpoint(state, older)
    scan = write_body_scans(tmp_path / "scans", 1) / "scan0.nii.gz"
    shift, output = _reconstruct(older, scan, tmp_path / "r")
    assert shift["shift_score"] is None and shift["warning"] is None
    assert output.count("carries no shift reference") == 1 and f"{older} carries no shift reference" in output


def torso(path: Path, seed: int, lungs: bool = True) -> Path:
    """A torso slab in 1.5 mm voxels: soft tissue in a rim of fat, a spine, and two lungs (chest-like) or a liver and
    two kidneys (abdomen-like: low-contrast soft tissue, easier to fill than lung); ``seed`` varies sizes and noise."""
    rng = np.random.default_rng(seed)
    x, y, z = np.mgrid[0:64, 0:52, 0:40].astype(np.float32)
    a, b = 28 + rng.uniform(-2, 2), 21 + rng.uniform(-2, 2)
    r = np.sqrt(((x - 32) / a) ** 2 + ((y - 26) / b) ** 2)
    ct = np.full(x.shape, -1000.0, np.float32)
    ct[r < 1.0] = -100.0
    ct[r < 0.88] = 40.0
    ct[np.sqrt((x - 32) ** 2 + (y - 33 + b) ** 2) < 4] = 700.0  # the spine
    if lungs:
        for side in (-1, 1):
            cx = 32 + side * (0.45 * a + rng.uniform(-1, 1))
            ct[np.sqrt(((x - cx) / (0.33 * a)) ** 2 + ((y - 28) / (0.6 * b)) ** 2 + ((z - 20) / 26) ** 2) < 1] = -850.0
    else:
        ct[np.sqrt(((x - 32 + 0.4 * a) / (0.45 * a)) ** 2 + ((y - 28) / (0.6 * b)) ** 2) < 1] = 60.0  # the liver
        for side in (-1, 1):
            ct[np.sqrt(((x - 32 - 9 * side) / 4) ** 2 + ((y - 38 + b) / 3) ** 2 + ((z - 20) / 8) ** 2) < 1] = 30.0
    ct += rng.normal(0, 15, ct.shape) * (r < 1.0)
    return write_volume(path, ct, spacing=(1.5, 1.5, 1.5), direction=AXIS)


def test_a_chest_trained_model_ranks_other_regions_above_a_held_out_chest(tmp_path):
    """Trained briefly on three chest-like torsos: two more stay below the warning, an abdomen-like torso and a head
    phantom score far above it. (A raw reconstruction error ranked the abdomen-like torso below the chests: its soft
    tissue is easier to fill than lung.)"""
    cfg = RunConfig.from_dict(
        {
            "model": {"size": "tiny", "patch": 16},
            "data": {"crop": 32, "workers": 0, "cache_dir": str(tmp_path / "cache")},
            "train": {"steps": 20, "batch_size": 4, "lr": 1e-3},
        }
    )
    for i in range(3):
        torso(tmp_path / "train" / f"chest{i}.nii.gz", i)
    sources, _ = find_volumes([str(tmp_path / "train")])
    good, _ = build_cache(sources, cfg.preprocess)
    pretrain(cfg, good, tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    model, transform = model_from_checkpoint(state), preprocess_transforms(cfg.preprocess)

    def score(path: Path) -> float:
        (source,), _ = find_volumes([path])
        return shift_score(model, transform({"image": list(source.files)})["image"][0], state["shift_reference"])

    chests = [score(torso(tmp_path / f"chest{i}.nii.gz", i)) for i in (10, 11)]
    abdomen = score(torso(tmp_path / "abdomen.nii.gz", 12, lungs=False))
    head = score(head_phantom(tmp_path / "head.nii.gz"))
    assert max(chests) < WARN_SCORE < 10 * WARN_SCORE < min(abdomen, head), (chests, abdomen, head)


def test_reconstruct_prints_the_score_and_warns_far_from_the_training_scans(tiny_checkpoint, tmp_path):
    """The fixture was pretrained on the sample chest CT: its upper slab scores low, a head phantom above the line."""
    shift, output = _reconstruct(tiny_checkpoint, DEMO / "heldout" / "lung1_upper.nii.gz", tmp_path / "a")
    assert shift["shift_score"] < WARN_SCORE and shift["warning"] is None and "unlike the pretraining" not in output
    assert f"shift score {shift['shift_score']:.1f} (warning above {WARN_SCORE:g})" in output
    head = head_phantom(tmp_path / "head.nii.gz")
    shift, output = _reconstruct(tiny_checkpoint, head, tmp_path / "b")
    assert shift["shift_score"] > WARN_SCORE and shift["warning"] in output
    assert f"{head}: shift score {shift['shift_score']:.1f} (warning above {WARN_SCORE:g})" in output
