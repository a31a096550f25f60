"""DICOM series discovery and slice-geometry checks, through SimpleITK's GDCM bindings.

Raw DICOM UIDs never leave this module: a series is named by a short hash of its SeriesInstanceUID, so ids, messages
and metadata built from it cannot leak identifiers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

UID_HASH_CHARS = 12
# Tags the same on every slice of a series written by `write_series` (besides UIDs, patient and modality).
_SERIES_TAGS = {
    "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",  # Image Type
    "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # SOP Class: CT Image Storage
    "0008|0020": "20000101",  # Study Date: fixed, so rewriting gives identical files
    "0008|0021": "20000101",  # Series Date
    "0008|0030": "120000",  # Study Time
    "0008|0031": "120000",  # Series Time
    "0008|0012": "20000101",  # Instance Creation Date
    "0008|0013": "120000",  # Instance Creation Time
    "0010|0030": "",  # Patient's Birth Date: present but empty
    "0028|1052": "0",  # Rescale Intercept: stored values are HU
    "0028|1053": "1",  # Rescale Slope
    "0028|1054": "HU",  # Rescale Type
}
# Gaps between consecutive slices may differ from the median gap by this fraction, or this many mm if larger.
SPACING_REL_TOL = 0.01
SPACING_ABS_TOL_MM = 0.01
ORIENTATION_TOL = 1e-3  # direction cosines of all slices must agree this closely


@dataclass(frozen=True)
class DicomSeries:
    """One image series found in a folder.

    Attributes:
        folder: absolute path of the folder holding the files.
        uid_hash: the first `UID_HASH_CHARS` hex characters of sha256(SeriesInstanceUID).
        files: absolute paths, sorted by slice position along the slice normal.
    """

    folder: str
    uid_hash: str
    files: tuple[str, ...]


@contextlib.contextmanager
def itk_warnings_off() -> Iterator[None]:
    """Silence ITK's stderr warnings (e.g. GDCM's "No Series were found"); ctmae reports problems itself."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def has_dicom_magic(path: str) -> bool:
    """Whether `path` starts with a DICOM Part 10 preamble (128 bytes, then "DICM")."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def uid_hash(uid: str) -> str:
    """A short, one-way name for a DICOM UID."""
    return hashlib.sha256(uid.strip("\0 ").encode()).hexdigest()[:UID_HASH_CHARS]


def series_in_folder(folder: str) -> list[DicomSeries]:
    """List the image series whose files lie directly in `folder` (not in subfolders).

    Args:
        folder: the folder to scan; GDCM recognises DICOM files whatever their extension.

    Returns:
        One entry per SeriesInstanceUID, sorted by uid_hash; empty when GDCM finds no image series.
    """
    folder = os.path.abspath(folder)
    with itk_warnings_off():
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
        found = [
            DicomSeries(folder, uid_hash(uid), tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid)))
            for uid in uids
        ]
    return sorted((s for s in found if s.files), key=lambda s: s.uid_hash)


def series_geometry_problem(files: Sequence[str]) -> str | None:
    """Check that a series' slices share one orientation and are evenly spaced along the slice normal.

    ITK only warns about uneven spacing and then assumes an even grid, which would silently distort the volume,
    so a missing or duplicated slice, or a slice tilted differently from the rest, is refused here.

    Args:
        files: the series' files, sorted by slice position (as `series_in_folder` gives them).

    Returns:
        A short reason when the geometry is inconsistent, otherwise None.
    """
    reader = sitk.ImageFileReader()
    positions, directions = [], []
    for path in files:
        reader.SetFileName(path)
        reader.ReadImageInformation()
        positions.append(reader.GetOrigin())
        directions.append(reader.GetDirection())
    if np.abs(np.asarray(directions) - np.asarray(directions[0])).max() > ORIENTATION_TOL:
        return "inconsistent slice orientation (ImageOrientationPatient differs between slices)"
    if len(files) < 3:
        return None
    # ITK derives the third direction column as the slice normal (row x column cosines).
    normal = np.asarray(directions[0]).reshape(3, 3)[:, 2]
    gaps = np.diff(np.asarray(positions) @ normal)
    expected = float(np.median(gaps))
    if abs(expected) < SPACING_ABS_TOL_MM or np.any(np.abs(gaps) < SPACING_ABS_TOL_MM):
        return "duplicate slice positions"
    if np.any(np.abs(gaps - expected) > max(SPACING_REL_TOL * abs(expected), SPACING_ABS_TOL_MM)):
        return "uneven slice spacing (missing slice?)"
    return None


def series_modality(path: str) -> str:
    """The Modality tag (0008,0060) of a DICOM file, e.g. "CT" or "MR"; empty when absent."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader.GetMetaData("0008|0060").strip() if reader.HasMetaDataKey("0008|0060") else ""


def read_series(files: Sequence[str]) -> sitk.Image:
    """Read a series' files (sorted by position) into one 3D image, without keeping any DICOM tags."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    reader.MetaDataDictionaryArrayUpdateOff()
    reader.LoadPrivateTagsOff()
    return reader.Execute()


def deterministic_uid(seed: str) -> str:
    """A valid DICOM UID under the UUID-derived root 2.25, the same for the same seed."""
    return "2.25." + str(int(hashlib.sha256(seed.encode()).hexdigest()[:32], 16))


def write_series(
    image: sitk.Image,
    folder: str | os.PathLike,
    series_uid: str,
    patient_name: str,
    patient_id: str,
    modality: str = "CT",
    description: str = "",
    skip_slices: Sequence[int] = (),
    compress: bool = False,
) -> list[Path]:
    """Write a 3D int16 image as a DICOM series, one file per Z slice, after SimpleITK's "Dicom Series From Array".

    Each slice is written as a one-slice 3D image, so GDCM takes ImagePositionPatient, ImageOrientationPatient and
    PixelSpacing from its geometry (exact for oblique directions too). Every other UID is derived from `series_uid`
    and dates are fixed, so the same arguments always give byte-identical files.

    Args:
        image: the volume, int16 HU (stored with slope 1, intercept 0); its direction should be right-handed for
            the series to read back in the same slice order.
        folder: where the files `slice_0000.dcm`, ... go (created if missing).
        series_uid: SeriesInstanceUID.
        patient_name, patient_id, modality, description: written as given.
        skip_slices: slice indices left out (to make a series with a missing slice).
        compress: store pixels as lossless JPEG 2000 (GDCM's default codec), about 2.5x smaller for CT.

    Returns:
        The files written, in slice order.
    """
    if image.GetPixelID() != sitk.sitkInt16 or image.GetDimension() != 3:
        kind = f"{image.GetDimension()}D {image.GetPixelIDTypeAsString()}"
        raise ValueError(f"write_series needs a 3D int16 image, got {kind}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # use the UIDs set here, not fresh random ones
    writer.SetUseCompression(compress)
    shared = {
        **_SERIES_TAGS,
        "0008|0060": modality,
        "0008|103e": description,
        "0010|0010": patient_name,
        "0010|0020": patient_id,
        "0018|0050": f"{image.GetSpacing()[2]:g}",  # Slice Thickness
        "0020|000d": deterministic_uid(f"study:{series_uid}"),  # Study Instance UID
        "0020|000e": series_uid,
        "0020|0052": deterministic_uid(f"frame:{series_uid}"),  # Frame of Reference UID
    }
    written = []
    for k in range(image.GetDepth()):
        if k in skip_slices:
            continue
        slice_ = image[:, :, k : k + 1]
        for tag, value in shared.items():
            slice_.SetMetaData(tag, value)
        slice_.SetMetaData("0008|0018", deterministic_uid(f"instance:{series_uid}:{k}"))  # SOP Instance UID
        slice_.SetMetaData("0020|0013", str(k + 1))  # Instance Number
        path = folder / f"slice_{k:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(slice_)
        written.append(path)
    return written
