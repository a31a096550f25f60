"""Reading and writing CT volumes: the one owner of file formats, axis order and geometry.

Every format (NIfTI, NRRD, MetaImage, DICOM series) is read with SimpleITK. Arrays are (X, Y, Z) in the file's
voxel index order i, j, k; affines are 4x4 and map (i, j, k, 1) to RAS millimetres, converted from ITK's LPS exactly
as MONAI's ITKReader does, so ctmae's geometry agrees with MONAI's readers and transforms.
"""

from __future__ import annotations

import ctypes
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
from ctmae.io.dicom import itk_warnings_off, read_series, series_geometry_problem, slice_geometry
from ctmae.io.discovery import VolumeSource, files_label, find_volumes
from ctmae.runtime.files import atomic_path

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# CTReader.read stores the name it was given on the image, so get_data can report "filename_or_obj".
_FILENAME_KEY = "ctmae_filename"
_SITK_TYPES = {
    np.dtype(np.uint8): sitk.sitkUInt8,
    np.dtype(np.int8): sitk.sitkInt8,
    np.dtype(np.uint16): sitk.sitkUInt16,
    np.dtype(np.int16): sitk.sitkInt16,
    np.dtype(np.uint32): sitk.sitkUInt32,
    np.dtype(np.int32): sitk.sitkInt32,
    np.dtype(np.uint64): sitk.sitkUInt64,
    np.dtype(np.int64): sitk.sitkInt64,
    np.dtype(np.float32): sitk.sitkFloat32,
    np.dtype(np.float64): sitk.sitkFloat64,
}
_READ_BYTES = 1 << 20  # bytes asked of the (gzip) file at a time: what it decompresses into a temporary buffer
_SLAB_BYTES = 1 << 23  # scaled voxels are read and converted this many stored bytes at a time


class _ShortRead(Exception):
    """The file ended before the voxel data did."""


def _read_nifti(path: str) -> sitk.Image:
    """Read a NIfTI file, decompressing it once, straight into the SimpleITK image's buffer.

    Geometry and shape come from SimpleITK's header reader, so geometry (its sform/qform choice) and shape checks
    match every other format; the voxel layout (offset, stored type, byte order, scl_slope/scl_inter) from nibabel's
    header. The voxel bytes are then streamed (through gzip for .nii.gz) into a SimpleITK image of the stored type:
    the peak is about one decompressed volume (the whole file in memory, decompressed, then copied took ~3x). Scaled
    voxels are converted slab by slab into a float32 image (float64 for float64 data), as nibabel scales them.
    SimpleITK's own reader is not used for voxels: it fills a truncated file with zeros and silently replaces NaN/inf
    by 0; here a short file and a corrupt gzip stream (its CRC is checked to the end) are refused, and non-finite
    values are kept for ``_read_image`` to count.

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
        layout = nib.load(path).dataobj  # nibabel's proxy of the voxels, which stay in the file
        stored, slope, inter = layout.dtype, float(layout.slope), float(layout.inter)
        if int(np.prod(layout.shape)) != int(np.prod(size)) or stored.fields is not None or layout.order != "F":
            raise ValueError("nibabel's and ITK's headers disagree")  # ITK's size drops trailing axes of length 1
        scaled = (slope, inter) != (1.0, 0.0)
        native = stored.newbyteorder("=")
        out = (
            native
            if not scaled and native in _SITK_TYPES
            else np.dtype(np.float64 if native.itemsize > 4 else np.float32)
        )
        image = sitk.Image(list(size), _SITK_TYPES[out])
        voxels = _writable_view(image)  # (Z, Y, X): the file's voxel order (x fastest)
        with gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb") as f:
            f.seek(int(layout.offset))  # where nibabel reads the voxels (vox_offset, or 352 when it is 0)
            if out == native and not scaled:
                _read_exactly(f, voxels.reshape(-1).view(np.uint8))
                if not stored.isnative:
                    voxels.byteswap(inplace=True)  # the stored bytes, big-endian on this machine: swapped in place
            else:
                _read_scaled(f, voxels.reshape(-1), stored, slope, inter)
            while f.read(1 << 20):  # to the end of the gzip stream, whose CRC is checked there
                pass
    except (EOFError, zlib.error, gzip.BadGzipFile):
        raise InputError(f"{path}: truncated or corrupt gzip data") from None
    except _ShortRead:
        raise InputError(f"{path}: truncated file (voxel data incomplete)") from None
    except (ImageFileError, HeaderDataError, ValueError, KeyError):
        raise InputError(f"{path}: not a readable image (unknown format or corrupt header)") from None
    image.SetSpacing(header.GetSpacing())
    image.SetOrigin(header.GetOrigin())
    image.SetDirection(header.GetDirection())
    return image


def _writable_view(image: sitk.Image) -> np.ndarray:
    """A writable NumPy view (Z, Y, X) of a new image's own buffer (SimpleITK hands out read-only views only); it is
    valid while ``image`` lives and is not resized."""
    view = sitk.GetArrayViewFromImage(image)  # makes the buffer the image's own (MakeUnique)
    buffer = (ctypes.c_byte * view.nbytes).from_address(view.__array_interface__["data"][0])
    return np.frombuffer(buffer, dtype=view.dtype).reshape(view.shape)


def _read_exactly(f, target: np.ndarray) -> None:
    """Fill ``target`` (bytes) from ``f``; raises ``_ShortRead`` when the file ends first."""
    view, done = memoryview(target), 0
    while done < len(view):
        n = f.readinto(view[done : done + _READ_BYTES])
        if not n:
            raise _ShortRead
        done += n


def _read_scaled(f, target: np.ndarray, stored: np.dtype, slope: float, inter: float) -> None:
    """Fill ``target`` (flat, float) with stored values · slope + inter, read a slab at a time."""
    step = max(1, _SLAB_BYTES // stored.itemsize)
    raw = np.empty(step, stored)
    for start in range(0, target.size, step):
        n = min(step, target.size - start)
        _read_exactly(f, raw[:n].view(np.uint8))
        np.multiply(raw[:n], slope, out=target[start : start + n], casting="unsafe")
        target[start : start + n] += inter


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
                positions, directions = slice_geometry(files)
                problem = series_geometry_problem(files, positions, directions)
                image = None if problem else read_series(files, positions)
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
