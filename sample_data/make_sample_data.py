"""Regenerate ctmae's sample data: two patients, a chest CT (pyradiomics' lung1, BSD-3-Clause) and an abdominal CT
with an organ map (TotalSegmentator's test files, Apache-2.0).

Usage: python sample_data/make_sample_data.py lung1 PYRADIOMICS_DATA_DIR
       python sample_data/make_sample_data.py abdomen TOTALSEGMENTATOR_DIR

PYRADIOMICS_DATA_DIR holds lung1_image.nrrd, lung1_label.nrrd and LICENSE-pyradiomics.txt, e.g. the data/ folder of
the pyradiomics 3.1.0 source distribution with its LICENSE.txt copied in. TOTALSEGMENTATOR_DIR holds
abdomen_pelvis_ct.nii.gz, upper_abdomen_ct.nii.gz, upper_abdomen_labels.nii.gz, labels.json and LICENSE: the
TotalSegmentator 2.18.0 source distribution's tests/reference_files/ example_ct.nii.gz, example_ct_sm.nii.gz and
example_seg.nii.gz renamed so, its class names and its LICENSE (see README.md).

lung1 is resampled in-plane from about 0.6 mm to about 1.5 mm (keeping the 5 mm slices, the physical extent and the
orientation) so the samples stay small, written as NIfTI and as a DICOM series, with its tumour label as NIfTI on the
same grid, and split at LUNG1_HELD_OUT_FROM for the demo. The abdominal CT (3 mm) is split at ABDOMEN_HELD_OUT_FROM,
where its labelled upper slab begins, and the organ map is written on that slab's grid. Every output is
deterministic: re-running gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ctmae.io.dicom_writer import deterministic_uid, write_series
from ctmae.io.discovery import find_volumes, skipped_only
from ctmae.io.volume import CTReader, read_volume, write_nifti

TARGET_INPLANE_MM = 1.5
OUT = Path(__file__).resolve().parent
SOURCE_FILES = ("lung1_image.nrrd", "lung1_label.nrrd")
LICENSE = "LICENSE-pyradiomics.txt"
AIR_HU = -1024
# The demo pretrains on the slices below this one and is scored on the slices from it up (80 mm, the lung apices and
# the tumour), a slab of the scan that pretraining never saw.
LUNG1_HELD_OUT_FROM = 32
ABDOMEN_FILES = ("abdomen_pelvis_ct.nii.gz", "upper_abdomen_ct.nii.gz", "upper_abdomen_labels.nii.gz", "labels.json")
ABDOMEN_LICENSE = "LICENSE-totalsegmentator.txt"
# The labelled upper-abdomen CT is slices 82-111 of the abdomen-pelvis CT, voxel for voxel (its header gives it the
# whole scan's origin, 246 mm too low); the demo pretrains on the slices below and holds the labelled slab out.
ABDOMEN_HELD_OUT_FROM = 82


def in_plane_grid(image: sitk.Image) -> tuple[list[int], list[float], list[float]]:
    """(size, spacing, origin) of a grid with ~TARGET_INPLANE_MM in-plane voxels covering the same extent.

    The in-plane spacing is the extent divided by a whole voxel count, and the first voxel centre moves by half
    the spacing change, so the outer voxel edges stay where they were.
    """
    size, spacing = list(image.GetSize()), list(image.GetSpacing())
    new_size, new_spacing = list(size), list(spacing)
    for axis in (0, 1):
        extent = size[axis] * spacing[axis]
        new_size[axis] = round(extent / TARGET_INPLANE_MM)
        new_spacing[axis] = extent / new_size[axis]
    shift = [(new_spacing[a] - spacing[a]) / 2 for a in range(3)]
    origin = np.asarray(image.GetOrigin()) + np.asarray(image.GetDirection()).reshape(3, 3) @ shift
    return new_size, new_spacing, origin.tolist()


def resample(image: sitk.Image, grid, interpolator: int, default: float, pixel: int) -> sitk.Image:
    """`image` on `grid` = (size, spacing, origin), same direction."""
    size, spacing, origin = grid
    return sitk.Resample(
        image, size, sitk.Transform(), interpolator, origin, spacing, image.GetDirection(), default, pixel
    )


def write_as_nifti(image: sitk.Image, dtype: type, path: Path) -> None:
    """Write through ctmae's own geometry conventions (CTReader.get_data gives the RAS affine)."""
    array, meta = CTReader().get_data(image)
    write_nifti(np.rint(array).astype(dtype), meta["affine"], path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def small_ct(path: Path) -> tuple[sitk.Image, tuple]:
    """The CT at `path` on its ~1.5 mm in-plane grid, and the grid: linear in float, rounded back to whole HU."""
    ct = sitk.ReadImage(str(path))
    grid = in_plane_grid(ct)
    ct_small = resample(sitk.Cast(ct, sitk.sitkFloat32), grid, sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
    return sitk.Cast(sitk.Round(ct_small), sitk.sitkInt16), grid


def make_lung1(source_dir: str) -> None:
    """ct/, labels/ and dicom/ lung1, and its demo split, from pyradiomics' data folder."""
    src = Path(source_dir)
    for name in SOURCE_FILES:
        print(f"source {name}: sha256 {sha256(src / name)}")
    ct_small, grid = small_ct(src / SOURCE_FILES[0])
    label_small = resample(
        sitk.ReadImage(str(src / SOURCE_FILES[1])), grid, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
    )

    write_as_nifti(ct_small, np.int16, OUT / "ct" / "lung1.nii.gz")
    write_as_nifti(label_small, np.uint8, OUT / "labels" / "lung1.nii.gz")
    split = LUNG1_HELD_OUT_FROM
    write_as_nifti(ct_small[:, :, :split], np.int16, OUT / "demo" / "pretrain" / "lung1_lower.nii.gz")
    write_as_nifti(ct_small[:, :, split:], np.int16, OUT / "demo" / "heldout" / "lung1_upper.nii.gz")
    dicom_dir = OUT / "dicom" / "lung1"
    shutil.rmtree(dicom_dir, ignore_errors=True)
    write_series(
        ct_small,
        dicom_dir,
        deterministic_uid("ctmae sample_data lung1"),
        "Anonymous",
        "SAMPLE",
        description="lung1 (pyradiomics), resampled",
        compress=True,
    )
    shutil.copyfile(src / LICENSE, OUT / LICENSE)


def make_abdomen(source_dir: str) -> None:
    """The abdominal CT split for the demo, and the organ map of its upper slab, from TotalSegmentator's test files."""
    src = Path(source_dir)
    for name in ABDOMEN_FILES:
        print(f"source {name}: sha256 {sha256(src / name)}")
    whole = sitk.ReadImage(str(src / ABDOMEN_FILES[0]))
    upper = whole[:, :, ABDOMEN_HELD_OUT_FROM:]  # keeps its true origin
    same = sitk.GetArrayFromImage(sitk.ReadImage(str(src / ABDOMEN_FILES[1]))) == sitk.GetArrayFromImage(upper)
    assert same.all(), "the upper-abdomen CT is no longer the abdomen-pelvis CT's upper slab"
    labels = sitk.ReadImage(str(src / ABDOMEN_FILES[2]))
    labels.CopyInformation(upper)  # the same voxels as the slab, so the slab's geometry
    write_as_nifti(whole[:, :, :ABDOMEN_HELD_OUT_FROM], np.int16, OUT / "demo" / "pretrain" / "abdomen_lower.nii.gz")
    write_as_nifti(upper, np.int16, OUT / "demo" / "heldout" / "abdomen_upper.nii.gz")
    write_as_nifti(labels, np.uint8, OUT / "organs" / "abdomen_upper.nii.gz")
    shutil.copyfile(src / ABDOMEN_FILES[3], OUT / "organs" / "labels.json")
    shutil.copyfile(src / "LICENSE", OUT / ABDOMEN_LICENSE)


def check() -> None:
    """Every sample reads back through ctmae.io; lung1's NIfTI and DICOM forms agree; labels fit their CT."""
    sources, problems = find_volumes([OUT / "ct", OUT / "labels", OUT / "dicom", OUT / "demo", OUT / "organs"])
    assert not skipped_only(problems), problems  # the names file beside the organ map is no volume
    volumes = {s.id.split("#")[0]: read_volume(s) for s in sources}
    (ct_array, ct_affine), (dicom_array, dicom_affine) = volumes["ct/lung1.nii.gz"], volumes["dicom/lung1"]
    assert np.array_equal(ct_array, dicom_array) and np.allclose(ct_affine, dicom_affine, atol=1e-4)
    assert volumes["labels/lung1.nii.gz"][0].shape == ct_array.shape
    abdomen, labels = volumes["demo/heldout/abdomen_upper.nii.gz"], volumes["organs/abdomen_upper.nii.gz"]
    assert abdomen[0].shape == labels[0].shape and np.allclose(abdomen[1], labels[1])
    for s in sources:
        array, affine = volumes[s.id.split("#")[0]]
        size = sum(Path(f).stat().st_size for f in s.files)
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        print(f"{s.id}: {len(s.files)} file(s), {size} bytes, shape {array.shape}, spacing {np.round(spacing, 4)}")


if __name__ == "__main__":
    makers = {"lung1": make_lung1, "abdomen": make_abdomen}
    if len(sys.argv) != 3 or sys.argv[1] not in makers:
        sys.exit(__doc__.split("\n\n")[1])
    makers[sys.argv[1]](sys.argv[2])
    check()
