"""Telling a label map (a segmentation) from a CT scan by its voxels, so that labels are never trained on as CT.

A label map holds a handful of small non-negative class indices (0 = background) and nothing else; a CT scan holds
air at about -1000 HU and thousands of distinct values. A strided subsample rules out almost every scan at once; a
volume that looks like a label map there is confirmed on all its voxels, slab by slab.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ctmae.io.checks import InputError

MAX_CLASSES = 32  # more distinct values than this is not taken for a label map
MAX_CLASS_INDEX = 255  # class indices above this are not taken for a label map
_SAMPLE_VOXELS = 1 << 16  # voxels in the strided subsample
_SLAB_VOXELS = 1 << 22  # voxels checked at a time when confirming


def label_map_problem(image: sitk.Image) -> str | None:
    """Why ``image`` looks like a label map rather than a CT scan, or None.

    A label map here is a scalar volume whose voxels are all whole numbers in 0..``MAX_CLASS_INDEX``, with 2 to
    ``MAX_CLASSES`` distinct values (so no air-like HU). A blank volume (one value) is not called a label map: the
    body-region checks report it better.

    Args:
        image: a 3D scalar SimpleITK image, as ``ctmae.io.volume`` reads it.

    Returns:
        One short reason (e.g. "uint8 voxels holding only 0, 1, 2; no air"), or None for anything else.
    """
    array = sitk.GetArrayViewFromImage(image)  # (Z, Y, X), no copy
    if array.dtype.kind not in "iuf" or array.size == 0:
        return None
    step = max(1, round((array.size / _SAMPLE_VOXELS) ** (1 / 3)))
    if _class_values(array[::step, ::step, ::step]) is None:
        return None
    values = _class_values(array)
    if values is None:
        return None
    shown = ", ".join(str(v) for v in values[:6]) + (f", … ({len(values)} values)" if len(values) > 6 else "")
    return f"{array.dtype} voxels holding only {shown}; no air"


def refuse_label_map(image: sitk.Image, name: str) -> None:
    """Raise ``InputError`` naming ``name`` (the volume's file or series folder) when ``image`` looks like a label
    map; where an image is read for use as CT (pretraining's cache, embed, reconstruct, prediction)."""
    problem = label_map_problem(image)
    if problem:
        raise InputError(f"{name}: looks like a label map ({problem}), not a CT scan")


def _class_values(array: np.ndarray) -> list[int] | None:
    """The sorted distinct values of ``array`` (Z, Y, X) when they are 2..MAX_CLASSES whole numbers in
    0..MAX_CLASS_INDEX, else None; slab by slab along Z, stopping at the first slab that rules it out."""
    counts = np.zeros(MAX_CLASS_INDEX + 1, np.int64)
    rows = max(1, _SLAB_VOXELS // max(1, array[0].size))
    for start in range(0, array.shape[0], rows):
        slab = array[start : start + rows]
        if slab.min() < 0 or slab.max() > MAX_CLASS_INDEX:  # NaN compares False: caught by the next check
            return None
        if array.dtype.kind == "f" and not np.array_equal(slab, np.floor(slab)):
            return None
        counts += np.bincount(slab.astype(np.intp).ravel(), minlength=MAX_CLASS_INDEX + 1)
        if np.count_nonzero(counts) > MAX_CLASSES:
            return None
    values = np.flatnonzero(counts).tolist()
    return values if len(values) >= 2 else None
