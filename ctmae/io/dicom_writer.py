"""Writing a volume as a DICOM CT series (for tests, the sample data and benchmarks; ctmae itself never writes DICOM).

Every UID is derived from the series UID and dates are fixed, so the same arguments give byte-identical files.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import SimpleITK as sitk

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
