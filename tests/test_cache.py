"""The volume cache holds what ``preprocess_transforms`` produces, although it resamples with SimpleITK."""

from __future__ import annotations

import json
import zlib

import nibabel as nib
import numpy as np
import pytest

from conftest import OBLIQUE, write_dicom_series
from ctmae.io.discovery import VolumeSource
from ctmae.mae.config import DataConfig
from ctmae.preprocess.cache import VolumeCache
from ctmae.preprocess.transforms import preprocess_transforms

LPS = np.diag([-0.7, -0.8, 2.5, 1.0])  # RAS affine of an LPS-stored volume, spacing 0.7 x 0.8 x 2.5 mm
SAGITTAL = np.array([[0.0, 0.0, -2.5, 40.0], [0.8, 0.0, 0.0, -20.0], [0.0, -0.7, 0.0, 60.0], [0, 0, 0, 1]])
TILTED = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.block(  # conftest's oblique LPS direction, as a RAS affine
    [[np.asarray(OBLIQUE).reshape(3, 3) @ np.diag([0.7, 0.8, 2.5]), np.array([[5.0], [-3.0], [2.0]])], [0, 0, 0, 1]]
)


def _ct(shape=(90, 80, 24), seed=0, edge=False) -> np.ndarray:
    """(X, Y, Z) int16 HU: air around a noisy box of tissue and bone, off-centre so the foreground crop matters;
    with ``edge`` the box touches the volume's borders on three sides."""
    rng = np.random.default_rng(seed)
    a = np.full(shape, -1000, np.int16)
    box = np.s_[0:70, 15:80, 0:20] if edge else np.s_[10:70, 15:60, 3:20]
    a[box] = rng.integers(-200, 900, a[box].shape)
    return a


def _nifti(path, affine, dtype=np.int16, slope=None, edge=False) -> VolumeSource:
    image = nib.Nifti1Image(_ct(edge=edge).astype(dtype), affine)
    image.set_sform(affine, code=1)
    if slope is not None:  # stored values v mean v * slope + inter HU
        image.header.set_slope_inter(*slope)
    nib.save(image, path)
    return VolumeSource(path.name, (str(path),), False)


def _dicom(path) -> VolumeSource:
    files = write_dicom_series(path, _ct(), spacing=(0.7, 0.8, 2.5), origin=(5.0, -3.0, 2.0))
    return VolumeSource(path.name, tuple(str(f) for f in files), True)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: _nifti(p / "lps.nii.gz", LPS),
        lambda p: _nifti(p / "edge.nii.gz", LPS, edge=True),
        lambda p: _nifti(p / "sagittal.nii", SAGITTAL),
        lambda p: _nifti(p / "tilted.nii.gz", TILTED),
        lambda p: _nifti(p / "scaled.nii.gz", LPS, dtype=np.float32, slope=(0.5, -10.0)),
        lambda p: _dicom(p / "series"),
    ],
    ids=["lps", "body-at-border", "sagittal", "oblique", "scaled-float", "dicom"],
)
def test_cache_equals_the_monai_chain(tmp_path, make):
    source = make(tmp_path)
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), crop=16)
    expected = preprocess_transforms(cfg)({"image": list(source.files)})["image"]  # (1, X, Y, Z), padded to 16
    npy = VolumeCache(cfg).ensure(source)
    cached = np.load(npy)
    meta = json.loads(npy.with_suffix(".json").read_text())
    assert cached.shape == tuple(expected.shape[1:])
    assert meta["bytes"] == npy.stat().st_size and meta["crc32"] == zlib.crc32(npy.read_bytes())  # CRC from memory
    np.testing.assert_allclose(meta["affine"], expected.affine.numpy(), atol=1e-6)
    np.testing.assert_allclose(cached, expected[0].numpy(), atol=1e-4)
