"""Telling a label map (a segmentation) from a CT scan by its voxels, so that labels are never trained on as CT.

A label map holds non-negative whole class indices (0 = background) in uniform regions; a CT scan holds air at about
-1000 HU (or, stored without its rescale intercept, thousands of distinct values from 0 to 4095) and noise, so
neighbouring voxels rarely agree. The rule, on the values as read (HU for a scan with a rescale intercept):

- every voxel a whole number in 0..``MAX_CLASS_INDEX``, with 2 to ``MAX_VALUES`` distinct values (no air);
- up to ``FEW_CLASSES`` values that is enough (a handful of classes);
- with more (TotalSegmentator's 117 organs), background (0) also covers at least ``MIN_BACKGROUND`` of the voxels,
  and the volume is made of uniform regions: at least ``MIN_UNIFORM`` of neighbouring voxel pairs outside the
  background are equal, and at most ``MAX_GRADUAL`` of them differ by a small step (1 or 2), as the smooth ramps of
  an 8-bit image do (a TotalSegmentator map at 3 mm: 0.83 and 0.02; the sample CTs windowed to 8 bits, even
  smoothed: at most 0.55 equal with 0.37 gradual, or under 0.3 equal).

A strided subsample rules out almost every scan at once; a volume that looks like a label map there is confirmed on
all its voxels, slab by slab.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ctmae.io.checks import InputError

FEW_CLASSES = 32  # up to this many distinct values, whole numbers 0..255 are a label map as they stand
MAX_VALUES = 255  # more distinct values than this is not taken for a label map
MAX_CLASS_INDEX = 255  # class indices above this are not taken for a label map
MIN_BACKGROUND = 0.1  # share of voxels at 0 a label map of many classes holds at least
MIN_UNIFORM = 0.5  # share of equal neighbours (outside the background) a label map of many classes holds at least
MAX_GRADUAL = 0.1  # share of neighbours one or two steps apart a label map of many classes holds at most
_SAMPLE_VOXELS = 1 << 16  # voxels in the strided subsample
_SLAB_VOXELS = 1 << 22  # voxels checked at a time when confirming


def label_map_problem(image: sitk.Image) -> str | None:
    """Why ``image`` looks like a label map rather than a CT scan, or None.

    A blank volume (one value) is not called a label map: the body-region checks report it better.

    Args:
        image: a 3D scalar SimpleITK image, as ``ctmae.io.volume`` reads it.

    Returns:
        One short reason (e.g. "uint8 voxels holding only 0, 1, 2; no air"), or None for anything else.
    """
    array = sitk.GetArrayViewFromImage(image)  # (Z, Y, X), no copy
    if array.dtype.kind not in "iuf" or array.size == 0:
        return None
    step = max(1, round((array.size / _SAMPLE_VOXELS) ** (1 / 3)))
    if _value_counts(array[::step, ::step, ::step]) is None:
        return None
    counts = _value_counts(array)
    if counts is None:
        return None
    values = np.flatnonzero(counts).tolist()
    if len(values) < 2:
        return None
    if len(values) > FEW_CLASSES and not _many_classes(array, counts):
        return None
    shown = ", ".join(str(v) for v in values[:6]) + (
        f", … {values[-1]} ({len(values)} values)" if len(values) > 6 else ""
    )
    return f"{array.dtype} voxels holding only {shown}; no air"


def refuse_label_map(image: sitk.Image, name: str) -> None:
    """Raise ``InputError`` naming ``name`` (the volume's file or series folder) when ``image`` looks like a label
    map; where an image is read for use as CT (pretraining's cache, embed, reconstruct, prediction)."""
    problem = label_map_problem(image)
    if problem:
        raise InputError(f"{name}: looks like a label map ({problem}), not a CT scan")


def class_counts(image: sitk.Image, name: str) -> np.ndarray:
    """Voxels per class index 0..MAX_CLASS_INDEX of a label volume, checked to hold whole numbers, slab by slab.

    Raises:
        InputError: naming ``name``: a value that is negative, not a whole number (or not finite), or above 255.
    """
    array = sitk.GetArrayViewFromImage(image)  # (Z, Y, X), no copy
    counts = np.zeros(MAX_CLASS_INDEX + 1, np.int64)
    rows = max(1, _SLAB_VOXELS // max(1, array[0].size))
    for start in range(0, array.shape[0], rows):
        slab = array[start : start + rows]
        if array.dtype.kind == "f" and not np.array_equal(slab, np.round(slab)):  # NaN is never equal
            raise InputError(f"{name}: label values must be class indices 0, 1, 2, ... (found non-integer values)")
        if slab.min() < 0:
            raise InputError(f"{name}: label values must be class indices 0, 1, 2, ... (found {slab.min():g})")
        if slab.max() > MAX_CLASS_INDEX:
            raise InputError(
                f"{name}: holds class {int(slab.max())}; labels hold class indices up to {MAX_CLASS_INDEX}"
            )
        counts += np.bincount(slab.astype(np.intp).ravel(), minlength=MAX_CLASS_INDEX + 1)
    return counts


def _value_counts(array: np.ndarray) -> np.ndarray | None:
    """Voxels per value 0..MAX_CLASS_INDEX of ``array`` (Z, Y, X) when every voxel is a whole number in that range
    and at most MAX_VALUES values occur, else None; slab by slab along Z, stopping at the first slab that rules it
    out."""
    counts = np.zeros(MAX_CLASS_INDEX + 1, np.int64)
    rows = max(1, _SLAB_VOXELS // max(1, array[0].size))
    for start in range(0, array.shape[0], rows):
        slab = array[start : start + rows]
        if slab.min() < 0 or slab.max() > MAX_CLASS_INDEX:  # NaN compares False: caught by the next check
            return None
        if array.dtype.kind == "f" and not np.array_equal(slab, np.floor(slab)):
            return None
        counts += np.bincount(slab.astype(np.intp).ravel(), minlength=MAX_CLASS_INDEX + 1)
        if np.count_nonzero(counts) > MAX_VALUES:
            return None
    return counts


def _many_classes(array: np.ndarray, counts: np.ndarray) -> bool:
    """Whether a volume of more than FEW_CLASSES whole values is a label map: enough background, and uniform
    regions with sharp borders between neighbours along X (the fastest axis, the finest in most scans)."""
    if counts[0] < MIN_BACKGROUND * counts.sum():
        return False
    pairs = equal = gradual = 0
    rows = max(1, _SLAB_VOXELS // max(1, array[0].size))
    for start in range(0, array.shape[0], rows):
        slab = array[start : start + rows].astype(np.int16)  # whole numbers 0..255, checked
        left, right = slab[..., :-1], slab[..., 1:]
        labelled = (left != 0) | (right != 0)
        step = np.abs(left - right)[labelled]
        pairs += step.size
        equal += np.count_nonzero(step == 0)
        gradual += np.count_nonzero((step == 1) | (step == 2))
    return pairs > 0 and equal >= MIN_UNIFORM * pairs and gradual <= MAX_GRADUAL * pairs
