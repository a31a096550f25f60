"""``ctmae reconstruct``: outputs on the source grid, mask ratio, visible voxels kept, whole-volume coverage, errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from conftest import SAMPLE_DATA, write_dicom_series, write_volume
from ctmae.apps.reconstruct import OUTPUTS
from ctmae.cli import app
from ctmae.io.discovery import find_volumes
from ctmae.io.volume import read_volume
from ctmae.mae.checkpoint import load_checkpoint
from ctmae.mae.config import MaskConfig
from ctmae.mae.masking import num_masked
from ctmae.mae.model import Decoder
from ctmae.runtime.checkpoint import save_checkpoint

runner = CliRunner()
LUNG = SAMPLE_DATA / "ct" / "lung1.nii.gz"


def _run(*args: str) -> object:
    return runner.invoke(app, ["reconstruct", *map(str, args)])


def _load(folder: Path, name: str) -> np.ndarray:
    return np.asarray(nib.load(folder / name).dataobj)


@pytest.fixture(scope="module")
def sample_run(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recon") / "lung1"
    result = _run(tiny_checkpoint, LUNG, "--out", out, "--mask-ratio", "0.6", "--seed", "3", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


def test_outputs_have_the_source_geometry(sample_run):
    array, affine = read_volume(find_volumes([LUNG])[0][0])
    for name in OUTPUTS:
        image = nib.load(sample_run / name)
        assert image.shape == array.shape, name
        np.testing.assert_allclose(image.affine, affine, atol=1e-4, err_msg=name)
    assert _load(sample_run, "mask.nii.gz").dtype == np.uint8
    png = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_run / "preview.png")))
    assert png.dtype == np.uint8 and png.ndim == 2 and png.max() > png.min()


def test_metrics_report_the_requested_mask(sample_run):
    metrics = json.loads((sample_run / "metrics.json").read_text())
    # exact on the token grid of the whole padded volume: round(ratio * L) of the L tokens are hidden
    assert metrics["tokens_masked"] == num_masked(MaskConfig("block", 0.6, 2), metrics["tokens"])
    assert metrics["token_mask_ratio"] == metrics["tokens_masked"] / metrics["tokens"]
    assert metrics["mask"] == {"kind": "block", "ratio": 0.6, "block": 2, "noise_std": 0.1, "seed": 3}
    mask = _load(sample_run, "mask.nii.gz").astype(bool)
    inside = metrics["masked"]["voxels"] + metrics["visible"]["voxels"]
    assert mask.sum() == metrics["masked"]["voxels"]
    assert metrics["mask_ratio"] == pytest.approx(mask.sum() / inside)
    # on source voxels the share only approximates the token share (padding tokens, resampling); a sanity bound
    assert abs(metrics["mask_ratio"] - 0.6) < 0.1
    assert np.isfinite(metrics["masked"]["mse"]) and np.isfinite(metrics["masked"]["psnr"])
    assert 0 < metrics["ssim"] <= 1
    assert metrics["checkpoint_step"] == 4 and "last.pt" in metrics["title"]


def test_visible_voxels_are_the_input_and_errors_are_finite(sample_run):
    lo, hi = -1000.0, 1000.0
    original = _load(sample_run, "input.nii.gz")
    recon = _load(sample_run, "reconstruction.nii.gz")
    mask = _load(sample_run, "mask.nii.gz").astype(bool)
    array, _ = read_volume(find_volumes([LUNG])[0][0])
    np.testing.assert_array_equal(original, np.clip(array, lo, hi))
    np.testing.assert_array_equal(recon[~mask], original[~mask])
    assert np.isfinite(recon).all() and (recon[mask] >= lo).all() and (recon[mask] <= hi).all()
    np.testing.assert_array_equal(_load(sample_run, "error.nii.gz"), np.abs(recon - original))
    masked = _load(sample_run, "masked.nii.gz")
    assert (masked[mask] == lo).all()
    np.testing.assert_array_equal(masked[~mask], original[~mask])


@pytest.mark.parametrize("kind", ["none", "block"])
def test_whole_volume_is_covered(tiny_checkpoint, tmp_path, monkeypatch, kind):
    """A volume whose preprocessed size (about 70, 50, 75 at 1.5 mm) is no multiple of the 64³ crop, all body.

    The decoder is replaced by a constant 0.25 (-500 HU), so any voxel a window missed would show.
    """
    rng = np.random.default_rng(1)
    scan = write_volume(tmp_path / "odd.nii.gz", rng.integers(-400, 600, size=(70, 50, 45)), spacing=(1.5, 1.5, 2.5))
    monkeypatch.setattr(
        Decoder,
        "forward",
        lambda self, latent, mask: torch.full((latent.shape[0], mask.ids_pred.shape[1], self.head.out_features), 0.25),
    )
    out = tmp_path / "out"
    assert _run(tiny_checkpoint, scan, "--out", out, "--mask", kind).exit_code == 0
    recon, original = _load(out, "reconstruction.nii.gz"), _load(out, "input.nii.gz")
    mask = _load(out, "mask.nii.gz").astype(bool)
    if kind == "none":  # nothing hidden: the model's output everywhere
        assert not mask.any()
        np.testing.assert_allclose(recon, -500.0, atol=1e-2)
    else:
        assert 0 < mask.mean() < 1
        np.testing.assert_allclose(recon[mask], -500.0, atol=1e-2)
        np.testing.assert_array_equal(recon[~mask], original[~mask])


def test_same_seed_repeats_and_another_differs(tiny_checkpoint, tmp_path, ct_array):
    scan = write_volume(tmp_path / "small.nii.gz", ct_array, spacing=(3.0, 3.0, 5.0))
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert _run(tiny_checkpoint, scan, "--out", tmp_path / name, "--seed", seed, "--mask", "random").exit_code == 0
    assert (tmp_path / "a" / "mask.nii.gz").read_bytes() == (tmp_path / "b" / "mask.nii.gz").read_bytes()
    assert (tmp_path / "a" / "metrics.json").read_text() == (tmp_path / "b" / "metrics.json").read_text()
    assert (tmp_path / "a" / "mask.nii.gz").read_bytes() != (tmp_path / "c" / "mask.nii.gz").read_bytes()


def test_dicom_input_leaks_no_patient_tags(tiny_checkpoint, tmp_path, ct_array):
    series = tmp_path / "patient" / "series1"
    write_dicom_series(series, ct_array, patient_name="Doe^Jane", patient_id="PID12345")
    out = tmp_path / "out"
    assert _run(tiny_checkpoint, series, "--out", out, "--mask", "noise").exit_code == 0
    files = sorted(out.iterdir())
    assert {f.name for f in files} == {*OUTPUTS, "preview.png", "metrics.json"}
    for f in files:
        data = f.read_bytes()
        if f.suffix == ".gz":
            data = gzip.decompress(data)
        for secret in (b"Doe", b"Jane", b"PID12345"):
            assert secret not in data, (f.name, secret)


def test_errors_are_one_line(tiny_checkpoint, tmp_path, ct_array):
    scan = write_volume(tmp_path / "small.nii.gz", ct_array)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}, "step": 1}, foreign)
    norm_pix = tmp_path / "normpix.pt"
    state = load_checkpoint(tiny_checkpoint)
    cfg = state["config"].replace(model={"norm_pix_loss": True})
    save_checkpoint(
        {**{k: v for k, v in state.items() if k not in ("format", "format_version")}, "config": cfg.to_dict()}, norm_pix
    )
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti at all" * 20)
    cases = [
        ((tmp_path / "missing.pt", scan), 1, "checkpoint not found"),
        ((foreign, scan), 1, "not a ctmae checkpoint"),
        ((norm_pix, scan), 1, "norm_pix_loss"),
        ((tiny_checkpoint, bad), 1, "bad.nii.gz"),
        ((tiny_checkpoint, tmp_path / "nothing.nii.gz"), 1, "does not exist"),
        ((tiny_checkpoint, scan, "--mask", "holes"), 2, "unknown mask kind"),
        ((tiny_checkpoint, scan, "--mask-ratio", "1.5"), 2, "mask ratio"),
    ]
    for args, code, words in cases:
        result = _run(*args[:2], "--out", tmp_path / "o", *args[2:])
        assert result.exit_code == code, (args, result.output)
        assert words in result.output and "Traceback" not in result.output, result.output
