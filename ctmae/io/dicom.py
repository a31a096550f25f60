"""DICOM series discovery, slice-geometry checks and gantry-tilt correction, through SimpleITK's GDCM bindings.

Raw DICOM UIDs never leave this module: a series is named by a short hash of its SeriesInstanceUID, so ids, messages
and metadata built from it cannot leak identifiers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

UID_HASH_CHARS = 12
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


def slice_geometry(files: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ImagePositionPatient (N, 3) mm, direction cosines (N, 9)) of each file of a series, from the headers."""
    reader = sitk.ImageFileReader()
    positions, directions = [], []
    for path in files:
        reader.SetFileName(path)
        reader.ReadImageInformation()
        positions.append(reader.GetOrigin())
        directions.append(reader.GetDirection())
    return np.asarray(positions), np.asarray(directions)


def series_geometry_problem(files: Sequence[str], positions: np.ndarray, directions: np.ndarray) -> str | None:
    """Check that a series' slices share one orientation and are evenly spaced along the slice normal.

    ITK only warns about uneven spacing and then assumes an even grid, which would silently distort the volume,
    so a missing or duplicated slice, or a slice tilted differently from the rest, is refused here.

    Args:
        files: the series' files, sorted by slice position (as `series_in_folder` gives them).
        positions, directions: their ``slice_geometry``.

    Returns:
        A short reason when the geometry is inconsistent, otherwise None.
    """
    if np.abs(np.asarray(directions) - np.asarray(directions[0])).max() > ORIENTATION_TOL:
        return "inconsistent slice orientation (ImageOrientationPatient differs between slices)"
    if len(files) < 3:
        return None
    # ITK derives the third direction column as the slice normal (row x column cosines).
    normal = np.asarray(directions[0]).reshape(3, 3)[:, 2]
    along = np.asarray(positions) @ normal  # (N,) mm along the slice normal
    gaps = np.diff(along)
    expected = float(np.median(gaps))
    if abs(expected) < SPACING_ABS_TOL_MM or np.any(np.abs(gaps) < SPACING_ABS_TOL_MM):
        return "duplicate slice positions"
    uneven = np.flatnonzero(np.abs(gaps - expected) > max(SPACING_REL_TOL * abs(expected), SPACING_ABS_TOL_MM))
    if uneven.size:
        return _uneven_spacing(files, along, gaps, expected, uneven)
    return None


def _uneven_spacing(
    files: Sequence[str], along: np.ndarray, gaps: np.ndarray, expected: float, uneven: np.ndarray
) -> str:
    """Name the slice that breaks the spacing: the outer one of a gap at either end of the series (a stray slice),
    otherwise the one after the first uneven gap (a missing slice lies just before it)."""
    gap = int(uneven[0])
    index = 0 if gap == 0 else gap + 1
    more = f"; {uneven.size - 1} more uneven gap(s)" if uneven.size > 1 else ""
    return (
        f"uneven slice spacing: {os.path.basename(files[index])} (at {along[index]:.1f} mm along the slice normal) "
        f"lies {abs(gaps[gap]):.1f} mm from its neighbour, expected {abs(expected):.1f} mm "
        f"(a missing slice or a stray one?){more}"
    )


def series_modality(path: str) -> str:
    """The Modality tag (0008,0060) of a DICOM file, e.g. "CT" or "MR"; empty when absent."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader.GetMetaData("0008|0060").strip() if reader.HasMetaDataKey("0008|0060") else ""


def read_series(files: Sequence[str], positions: np.ndarray | None = None) -> sitk.Image:
    """Read a series' files (sorted by position) into one 3D image, without keeping any DICOM tags; with the slices'
    ``positions`` (N, 3), a gantry-tilted series comes back on an orthogonal grid (``untilt``)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    reader.MetaDataDictionaryArrayUpdateOff()
    reader.LoadPrivateTagsOff()
    image = reader.Execute()
    return image if positions is None else untilt(image, positions)


def untilt(image: sitk.Image, positions: np.ndarray) -> sitk.Image:
    """The series ``image`` as its slices really lie, on an orthogonal grid (linear interpolation).

    ITK stacks a series' slices along their normal, one slice-to-slice distance apart. With a tilted gantry the table
    moves along another axis, so each slice also lies shifted within its plane from the one before, and the stack
    ITK returns is sheared by the tilt angle and stretched along the normal (anatomy and outputs misplaced by up to
    centimetres over a head scan). The image is resampled onto a grid with the slices' own axes, their true spacing
    along the normal and a box that holds every slice, air (the image's minimum) around them, as dcm2niix's tilt
    correction does. A shift under a tenth of a voxel over the whole stack is left as it is.

    Args:
        image: the series as ITK read it.
        positions: (N, 3) each slice's ImagePositionPatient (LPS mm), in the image's slice order.
    """
    n = len(positions)
    if n < 2:
        return image
    direction = np.asarray(image.GetDirection()).reshape(3, 3)  # columns: row, column, normal
    spacing = np.asarray(image.GetSpacing())
    step = direction.T @ (positions[-1] - positions[0]) / (n - 1)  # (row, column, normal) mm per slice
    shift = np.array([step[0] / spacing[0], step[1] / spacing[1], 0.0])  # in-plane voxels per slice
    if step[2] <= 0 or np.abs(shift).max() * (n - 1) < 0.1:
        return image
    true_spacing = np.array([spacing[0], spacing[1], step[2]])
    lo = np.minimum(0.0, shift * (n - 1))  # (3,) index box of the slices as they lie
    hi = np.asarray(image.GetSize()) - 1 + np.maximum(0.0, shift * (n - 1))
    # an output point p -> ITK's point holding its voxel: origin + D M D^T (p - origin), in the slices' frame M
    # takes away each slice's in-plane shift and maps the true slice distance to ITK's
    frame = np.eye(3) - np.outer(step - [0.0, 0.0, spacing[2]], [0.0, 0.0, 1.0 / step[2]])
    transform = sitk.AffineTransform(3)
    transform.SetMatrix((direction @ frame @ direction.T).ravel().tolist())
    transform.SetCenter(image.GetOrigin())
    return sitk.Resample(
        image,
        [int(v) for v in np.ceil(hi - lo).astype(int) + 1],
        transform,
        sitk.sitkLinear,
        (np.asarray(image.GetOrigin()) + direction @ (true_spacing * lo)).tolist(),
        true_spacing.tolist(),
        direction.ravel().tolist(),
        float(sitk.GetArrayViewFromImage(image).min()),
        image.GetPixelID(),
    )
