"""What makes an input unusable, said in one line: the error type, the suffixes ctmae reads, shape checks, and
outputs that would overwrite an input."""

from __future__ import annotations

import os
from collections.abc import Iterable

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


class InputError(Exception):
    """A problem with one input, as one user-facing line that names the file and what is wrong (no traceback)."""


def shape_problem(size: tuple[int, ...], components: int) -> str | None:
    """Why a (size, components) image is not a scalar 3D volume, or None. `size` is in ITK order (X, Y, Z)."""
    shape = "x".join(str(n) for n in size)
    if components != 1:
        return f"{components} components per voxel (RGB/vector image, shape {shape}); ctmae needs a scalar volume"
    if len(size) != 3:
        return f"{len(size)}D image (shape {shape}); ctmae needs a 3D volume"
    if min(size) < 2:
        return f"a dimension smaller than 2 (shape {shape}); ctmae needs a 3D volume"
    return None


def condense_sitk_error(error: RuntimeError) -> str:
    """A short reason from a SimpleITK error, whose text carries C++ source paths and several lines."""
    text = str(error)
    if "Unable to determine ImageIO reader" in text:
        return "not a readable image (unknown format or corrupt header)"
    if "does not exist" in text:
        return "does not exist"
    if "orthonormal direction cosines" in text:  # ITK's NIfTI reader refuses a sheared affine
        return (
            "its affine is sheared (axes not at right angles, as an uncorrected gantry tilt leaves them), which ITK "
            "cannot read; resample it onto an orthogonal grid or export it again with tilt correction"
        )
    return "truncated or corrupt image data"


def ensure_not_inputs(paths: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse output ``paths`` that are among the ``inputs``' files (compared after resolving links): ctmae never
    overwrites a scan.

    Raises:
        InputError: one line naming the clashing path.
    """
    scans = {os.path.realpath(f) for f in inputs}
    for path in paths:
        if os.path.realpath(path) in scans:
            raise InputError(f"{path}: is one of the input scans; ctmae never overwrites inputs (choose another --out)")
