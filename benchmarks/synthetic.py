"""A synthetic CT-like volume: 512×512×200 int16 HU, spacing 0.7×0.7×1.5 mm, as .nii.gz and as a DICOM series.

Air (−1000 HU) around an elliptical body with a fat rim (−100), soft tissue (40), two lungs (−850) over the middle
of the z range, a spine and a rib ring of bone (700), plus gaussian noise — enough structure that foreground
cropping, resampling and compression behave as on a real chest CT.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ctmae.io.dicom_writer import deterministic_uid, write_series

SHAPE = (512, 512, 200)  # (X, Y, Z)
SPACING = (0.7, 0.7, 1.5)  # mm
ORIGIN = (-179.2, -179.2, -150.0)  # mm, LPS


def ct_volume(shape: tuple[int, int, int] = SHAPE, spacing=SPACING, seed: int = 0) -> np.ndarray:
    """(X, Y, Z) int16 HU."""
    nx, ny, nz = shape
    x = (np.arange(nx) - nx / 2) * spacing[0]  # mm from the centre
    y = (np.arange(ny) - ny / 2) * spacing[1]
    xx, yy = np.meshgrid(x, y, indexing="ij")  # (X, Y)
    body = (xx / 170) ** 2 + (yy / 120) ** 2  # < 1 inside the body
    angle = np.arctan2(yy, xx)
    rib_ring = (body > 0.78) & (body < 0.84) & (np.cos(angle * 24) > 0.3)
    spine = (xx**2 + (yy - 85) ** 2) < 15**2
    out = np.empty(shape, dtype=np.int16)
    for k in range(nz):
        t = k / max(nz - 1, 1)
        hu = np.full((nx, ny), -1000.0, dtype=np.float32)
        hu[body < 1] = -100  # fat rim
        hu[body < 0.85] = 40  # soft tissue
        lung_scale = max(0.0, np.sin(np.pi * (t - 0.1) / 0.8)) if 0.1 < t < 0.9 else 0.0
        if lung_scale > 0.05:
            for side in (-1, 1):
                lung = ((xx - side * 70) / (50 * lung_scale)) ** 2 + ((yy + 5) / (75 * lung_scale)) ** 2 < 1
                hu[lung] = -850
        hu[rib_ring] = 700
        hu[spine] = 700
        out[..., k] = hu
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, 20.0, size=shape).astype(np.float32)
    return np.clip(out + noise, -1024, 3071).astype(np.int16)


def _image(array_xyz: np.ndarray, spacing=SPACING, origin=ORIGIN) -> sitk.Image:
    image = sitk.GetImageFromArray(array_xyz.transpose(2, 1, 0))  # (X, Y, Z) -> SimpleITK's (Z, Y, X)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    return image


def write_nifti(path: Path, array_xyz: np.ndarray) -> Path:
    sitk.WriteImage(_image(array_xyz), str(path), useCompression=True)
    return path


def write_dicom(folder: Path, array_xyz: np.ndarray) -> Path:
    """One ``slice_NNNN.dcm`` per Z slice, int16, uncompressed (as a scanner would export)."""
    write_series(
        _image(array_xyz),
        folder,
        deterministic_uid(f"bench:{folder.name}"),
        "Anon^Bench",
        "BENCH",
        "CT",
        "ctmae benchmark series",
    )
    return folder
