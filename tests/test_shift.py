"""Distribution shift: the checkpoint stores its training scans' masked-reconstruction error; a scan unlike them scores
high. The one real CT in the project is a chest: the chest-like scans here are it and a mirrored, re-noised copy, and
the head is a synthetic skull-and-brain phantom (no real head CT ships with the project)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import write_volume
from ctmae.cli import app
from ctmae.io.discovery import find_volumes
from ctmae.mae.checkpoint import load_checkpoint, model_from_checkpoint
from ctmae.mae.shift import WARN_SCORE, crops_error, reference, scan_crops, shift_score, shift_warning
from ctmae.preprocess.transforms import preprocess_transforms

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "ct" / "lung1.nii.gz"
AXIS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def test_score_is_distance_from_the_training_mean_in_spreads():
    ref = reference([1.0, 1.2, 0.8])
    assert shift_score(ref["mean"], ref) == 0.0
    assert shift_score(ref["mean"] + 2 * ref["std"], ref) == pytest.approx(2.0)
    assert shift_warning("a.nii.gz", WARN_SCORE + 0.1).startswith("a.nii.gz: shift score")
    assert shift_warning("a.nii.gz", 1.0) is None


def test_scan_crops_are_fixed_and_padded():
    volume = torch.rand(20, 40, 50)
    a, b = scan_crops(volume, 32), scan_crops(volume, 32)
    assert a.shape == (4, 1, 32, 32, 32) and torch.equal(a, b)


def head_phantom(path: Path) -> Path:
    """A head: air, a 7 mm skull shell at 1000 HU, brain at 35 HU, in 1 mm voxels."""
    x, y, z = np.mgrid[0:160, 0:190, 0:150].astype(np.float32)
    r = np.sqrt(((x - 80) / 70) ** 2 + ((y - 95) / 85) ** 2 + ((z - 75) / 65) ** 2)
    ct = np.where(r < 1.0, 1000.0, -1000.0)
    ct[r < 0.9] = 35.0
    return write_volume(path, ct, spacing=(1.0, 1.0, 1.0), direction=AXIS)


@pytest.mark.slow
def test_a_chest_trained_model_scores_a_head_as_more_shifted_than_a_chest(tmp_path):
    run = tmp_path / "run"
    args = ["pretrain", str(SAMPLE), "--out", str(run), "--model", "tiny", "--crop", "32", "--patch", "8"]
    args += [
        "--steps",
        "150",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--workers",
        "0",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    assert CliRunner().invoke(app, args).exit_code == 0
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    ref = state["shift_reference"]
    assert len(ref["errors"]) == 1 and ref["mean"] > 0

    import nibabel as nib

    sample = nib.load(SAMPLE)
    noisy = sample.get_fdata()[::-1] + np.random.default_rng(0).normal(0, 20, sample.shape)  # mirrored chest
    other_chest = tmp_path / "chest2.nii.gz"
    nib.save(nib.Nifti1Image(noisy.astype(np.int16), sample.affine), other_chest)
    model, cfg = model_from_checkpoint(state), state["config"]

    def score(path: Path) -> float:
        (source,), _ = find_volumes([path])
        image = preprocess_transforms(cfg.data)({"image": list(source.files)})["image"]
        return shift_score(crops_error(model, scan_crops(image[0], cfg.data.crop), cfg), ref)

    chest, head = score(other_chest), score(head_phantom(tmp_path / "head.nii.gz"))
    assert head > chest + 1.0, (chest, head)


def test_reconstruct_reports_the_shift_score_and_warns_far_from_the_training_scans(tiny_checkpoint, tmp_path):
    """The fixture was pretrained on the sample chest CT: the sample scores near 0, a head phantom far above."""
    import json

    from ctmae.cli import app as cli

    chest = CliRunner().invoke(cli, ["reconstruct", str(tiny_checkpoint), str(SAMPLE), "--out", str(tmp_path / "a")])
    assert chest.exit_code == 0, chest.output
    shift = json.loads((tmp_path / "a" / "metrics.json").read_text(encoding="utf-8"))["shift"]
    assert abs(shift["shift_score"]) < WARN_SCORE and shift["warning"] is None and "shift score" not in chest.output

    head = head_phantom(tmp_path / "head.nii.gz")
    far = CliRunner().invoke(cli, ["reconstruct", str(tiny_checkpoint), str(head), "--out", str(tmp_path / "b")])
    assert far.exit_code == 0, far.output
    shift = json.loads((tmp_path / "b" / "metrics.json").read_text(encoding="utf-8"))["shift"]
    assert shift["shift_score"] > WARN_SCORE
    assert "shift score" in " ".join(far.output.split()) and "unlike the pretraining data" in far.output
