"""Reading and writing CT volumes: the one owner of file formats, axis order and geometry.

Every format (NIfTI, NRRD, MetaImage, DICOM series) is read with SimpleITK. Arrays are (X, Y, Z) in the file's
voxel index order i, j, k; affines are 4x4 and map (i, j, k, 1) to RAS millimetres, converted from ITK's LPS exactly
as MONAI's ITKReader does, so ctmae's geometry agrees with MONAI's readers and transforms.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from ctmae.io.checks import IMAGE_SUFFIXES, InputError, condense_sitk_error, shape_problem
from ctmae.io.dicom import itk_warnings_off, read_series, series_geometry_problem
from ctmae.io.discovery import VolumeSource, files_label, find_volumes
from ctmae.runtime.files import atomic_path

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# CTReader.read stores the name it was given on the image, so get_data can report "filename_or_obj".
_FILENAME_KEY = "ctmae_filename"
_NIFTI2_SIZEOF_HDR = (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c")  # 540, little- or big-endian


def _read_nifti(path: str) -> sitk.Image:
    """Read a NIfTI file, decompressing it once: geometry from SimpleITK's header reader, voxels from nibabel.

    SimpleITK reads a truncated file with zeros for the missing voxels and silently replaces NaN/inf by 0, so the
    voxels come from nibabel, which refuses a short file and keeps non-finite values for ``_read_image`` to count.
    The header is still ITK's, so geometry (its sform/qform choice) and shape checks match every other format.

    Raises:
        InputError: the header is unreadable, the image is not a scalar 3D volume, or the voxel data is incomplete.
        RuntimeError: SimpleITK's header error, for ``condense_sitk_error``.
    """
    header = sitk.ImageFileReader()
    header.SetFileName(path)
    header.ReadImageInformation()
    size = header.GetSize()
    problem = shape_problem(size, header.GetNumberOfComponents())
    if problem:
        raise InputError(f"{path}: {problem}")
    try:
        with open(path, "rb") as f:
            data = f.read()
        if path.lower().endswith(".gz"):
            data = gzip.decompress(data)
        klass = nib.Nifti2Image if data[:4] in _NIFTI2_SIZEOF_HDR else nib.Nifti1Image
        array = np.asanyarray(klass.from_bytes(data).dataobj)  # (X, Y, Z), Fortran order: ITK's (Z, Y, X) buffer
        array = array.astype(array.dtype.newbyteorder("="), copy=False)  # SimpleITK takes native byte order only
        array = array.reshape(size, order="F")  # drops trailing length-1 axes that ITK's size leaves out
    except (EOFError, zlib.error, gzip.BadGzipFile):
        raise InputError(f"{path}: truncated or corrupt gzip data") from None
    except OSError:  # nibabel: "Expected N bytes, got M bytes from object"
        raise InputError(f"{path}: truncated file (voxel data incomplete)") from None
    except (ImageFileError, HeaderDataError, ValueError):
        raise InputError(f"{path}: not a readable image (unknown format or corrupt header)") from None
    image = sitk.GetImageFromArray(array.T)  # (X, Y, Z) -> ITK's (Z, Y, X): a C-order view, which SimpleITK copies
    image.SetSpacing(header.GetSpacing())
    image.SetOrigin(header.GetOrigin())
    image.SetDirection(header.GetDirection())
    return image


def _read_image(files: Sequence[str]) -> sitk.Image:
    """Read and check one volume: a single image file, or a DICOM series' files sorted by position.

    Raises:
        InputError: one line naming the file (or the series' folder) and what is wrong.
    """
    label = files_label(files)
    missing = next((p for p in files if not os.path.isfile(p)), None)
    if missing is not None:
        raise InputError(f"{missing}: does not exist")
    if len(files) == 1 and os.path.getsize(files[0]) == 0:
        raise InputError(f"{label}: empty file (0 bytes)")
    problem = None
    try:
        with itk_warnings_off():
            if len(files) > 1:
                problem = series_geometry_problem(files)
                image = None if problem else read_series(files)
            elif files[0].lower().endswith((".nii", ".nii.gz")):
                image = _read_nifti(files[0])
            else:
                image = sitk.ReadImage(files[0])
    except RuntimeError as e:
        problem = condense_sitk_error(e)
    if not problem:
        problem = shape_problem(tuple(image.GetSize()), image.GetNumberOfComponentsPerPixel())
    if not problem:
        array = sitk.GetArrayViewFromImage(image)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            problem = f"{np.count_nonzero(~np.isfinite(array))} non-finite voxel values (NaN/inf)"
    if problem:
        raise InputError(f"{label}: {problem}")
    return image


def ras_affine(image: sitk.Image) -> np.ndarray:
    """The 4x4 float64 affine mapping a 3D image's voxel index (i, j, k, 1) to RAS mm."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return _LPS_TO_RAS @ affine


def itk_grid(affine: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    """(origin, spacing, direction) in ITK's LPS terms of the grid whose RAS affine is ``affine`` (4x4)."""
    lps = _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)  # the flip is its own inverse
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    return lps[:3, 3].tolist(), spacing.tolist(), (lps[:3, :3] / spacing).ravel().tolist()


def _array_and_affine(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(array (X, Y, Z) float32, RAS affine 4x4 float64) of a checked 3D scalar image."""
    array = sitk.GetArrayViewFromImage(image)  # (Z, Y, X)
    array = np.ascontiguousarray(array.transpose(2, 1, 0), dtype=np.float32)  # (Z, Y, X) -> (X, Y, Z)
    return array, ras_affine(image)


def read_volume(source: VolumeSource) -> tuple[np.ndarray, np.ndarray]:
    """Read one volume.

    Args:
        source: a volume from `find_volumes`.

    Returns:
        (array (X, Y, Z) float32 in the file's voxel index order, affine 4x4 float64 mapping (i, j, k, 1) to RAS mm).

    Raises:
        InputError: one line naming the file and what is wrong.
    """
    return _array_and_affine(_read_image(source.files))


class CTReader(ImageReader):
    """MONAI reader for ctmae's inputs, so `LoadImaged(keys="image", reader=CTReader())` reads them.

    Unlike MONAI's ITKReader, a sequence of several files is one DICOM series (`VolumeSource.files`), not channels
    to stack; a folder is read as the one DICOM series it holds. The metadata follows ITKReader's conventions but
    carries geometry only, never DICOM tags.
    """

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        """Whether `filename` looks like a ctmae input: an image file, a folder, or a series' files."""
        names = [os.fspath(n) for n in ensure_tuple(filename)]
        return len(names) > 1 or os.path.isdir(names[0]) or names[0].lower().endswith(IMAGE_SUFFIXES)

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs) -> sitk.Image:
        """Read one volume from a file, a DICOM series' files (sorted by position), or a one-series folder.

        Raises:
            InputError: one line naming the file and what is wrong.
        """
        names = [os.path.abspath(os.fspath(n)) for n in ensure_tuple(data)]
        files: Sequence[str] = names
        if len(names) == 1 and os.path.isdir(names[0]):
            sources, problems = find_volumes(names, skip_labels=False)  # read what was named, labels included
            if len(sources) != 1:
                reason = problems[0] if problems else f"{names[0]}: holds {len(sources)} volumes, expected one"
                raise InputError(reason)
            files = sources[0].files
        image = _read_image(files)
        image.SetMetaData(_FILENAME_KEY, names[0])
        return image

    def get_data(self, img: sitk.Image) -> tuple[np.ndarray, dict]:
        """(array (X, Y, Z) float32, meta) with ITKReader's keys: affine, original_affine (RAS), spatial_shape, ..."""
        filename = img.GetMetaData(_FILENAME_KEY) if img.HasMetaDataKey(_FILENAME_KEY) else ""
        array, affine = _array_and_affine(img)
        meta = {
            MetaKeys.ORIGINAL_AFFINE: affine,
            MetaKeys.AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape),
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            MetaKeys.SPACE: SpaceKeys.RAS,
            "spacing": np.asarray(img.GetSpacing()),
            "filename_or_obj": filename,
        }
        return array, meta


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> None:
    """Write a volume as NIfTI-1, atomically (a temporary file in the same folder, then a rename).

    Args:
        array: (X, Y, Z); its dtype is kept, except bool, which NIfTI lacks and is written as uint8.
        affine: 4x4 mapping (i, j, k, 1) to RAS mm; written as both sform and qform (code 1, scanner).
        path: a .nii or .nii.gz file; missing parent folders are created.

    Raises:
        ValueError: `array` is not 3D, `affine` is not 4x4, or `path` is not .nii/.nii.gz.
    """
    path = os.path.abspath(os.fspath(path))
    suffix = next((s for s in (".nii.gz", ".nii") if path.lower().endswith(s)), None)
    array = np.asarray(array)
    affine = np.asarray(affine, dtype=np.float64)
    if suffix is None or array.ndim != 3 or affine.shape != (4, 4):
        raise ValueError(
            f"write_nifti needs a 3D array, a 4x4 affine and a .nii/.nii.gz path; "
            f"got shape {array.shape}, affine {affine.shape}, path {path!r}"
        )
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = nib.Nifti1Image(array, affine, dtype=array.dtype)  # explicit dtype: nibabel refuses int64 otherwise
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:  # the temporary name keeps .nii.gz: nibabel picks gzip from the suffix
        nib.save(image, tmp)
