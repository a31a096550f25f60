"""Resampling onto the grid of MONAI's Orientationd → Spacingd, executed by SimpleITK in one pass.

MONAI's transforms, run lazily, decide the output grid (shape and RAS affine) without touching a voxel; SimpleITK's
multithreaded ResampleImageFilter then interpolates straight from the stored pixel type (e.g. int16) to float32.
This skips the float32 copy of the whole input, the flips and MONAI's grid_sample over the full-resolution grid.
The sampling matches Spacingd's bilinear mode with ``align_corners=False`` and ``padding_mode="border"``: both
interpolate linearly between voxel centres. Border mode clamps only the coordinate that left the volume and still
interpolates along the others; a one-voxel replicated border (ZeroFluxNeumannPad) gives ITK exactly that for
sample points up to a voxel outside, which covers Spacingd's grids (beyond it, ITK's nearest-neighbour extrapolator
takes over).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.transforms.utils import generate_spatial_bounding_box

from ctmae.io.volume import itk_grid, ras_affine


def resample_to_grid(image: sitk.Image, steps: Sequence[MapTransform], above: float | None = None) -> MetaTensor:
    """Resample a 3D scalar image onto the grid that ``steps`` would produce.

    Args:
        image: a checked volume from ``CTReader.read``.
        steps: MONAI dictionary transforms on key "image" built with ``lazy=True`` (e.g. Orientationd, Spacingd),
            applied one by one to a stand-in of the image's shape and affine to find the output grid. Not a
            ``Compose``: it would carry out the pending operations at its end.
        above: resample only the box of the output grid that can hold values above this threshold (see
            ``_region_above``); a crop to the voxels above it then equals the same crop of the full grid.

    Returns:
        MetaTensor (1, X, Y, Z) float32 whose ``affine`` is the RAS affine of the grid (or box) resampled.
    """
    size = tuple(image.GetSize())  # (X, Y, Z)
    stand_in = MetaTensor(torch.zeros(()).expand(1, *size), affine=torch.as_tensor(ras_affine(image)))  # no memory
    planned = {"image": stand_in}
    for step in steps:
        planned = step(planned)
    planned = planned["image"]
    affine = planned.peek_pending_affine().to(torch.float64).numpy()
    shape = [int(n) for n in planned.peek_pending_shape()]  # (X, Y, Z)
    region = None if above is None else _region_above(image, affine, shape, above)
    if region is not None:
        start, shape = region
        shift = np.eye(4)
        shift[:3, 3] = start
        affine = affine @ shift  # the box's first voxel becomes index (0, 0, 0); sample positions are unchanged
    origin, spacing, direction = itk_grid(affine)
    resampled = sitk.Resample(
        sitk.ZeroFluxNeumannPad(image, [1, 1, 1], [1, 1, 1]),  # origin moves with it: positions are unchanged
        shape,
        sitk.Transform(),
        sitk.sitkLinear,
        origin,
        spacing,
        direction,
        0.0,
        sitk.sitkFloat32,
        True,  # useNearestNeighborExtrapolator, beyond the padded border
    )
    array = sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)  # (Z, Y, X) -> (X, Y, Z), a view in Fortran order
    return MetaTensor(torch.from_numpy(array)[None], affine=torch.from_numpy(affine))  # (1, X, Y, Z)


def _region_above(
    image: sitk.Image, affine: np.ndarray, shape: Sequence[int], above: float
) -> tuple[list[int], list[int]] | None:
    """(start, size) of the output voxels, on the grid ``affine`` (RAS) / ``shape``, that can exceed ``above``.

    A linearly interpolated value is a convex combination of the input voxels around its sample point, so it can
    exceed ``above`` only within one input voxel of an input voxel that does: the box of those input voxels, widened
    by one voxel (and to infinity where it touches the border, which the extrapolation repeats), mapped onto the
    output grid. None when no input voxel exceeds ``above`` (the caller resamples everything).
    """
    lo, hi = generate_spatial_bounding_box(sitk.GetArrayViewFromImage(image)[None], lambda v: v > above)  # (Z, Y, X)
    lo, hi = np.array(lo[::-1], float), np.array(hi[::-1], float) - 1  # (X, Y, Z), inclusive
    if (hi < lo).any():
        return None
    far = 10.0 * max(image.GetSize())
    lo = np.where(lo == 0, -far, lo - 1)
    hi = np.where(hi == np.array(image.GetSize()) - 1, far, hi + 1)
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1)  # (3, 8) input indices
    to_output = np.linalg.inv(affine) @ ras_affine(image)  # input index -> output index
    mapped = to_output[:3, :3] @ corners + to_output[:3, 3:]  # (3, 8)
    start = np.clip(np.floor(mapped.min(1)).astype(int), 0, np.array(shape) - 1)
    end = np.clip(np.ceil(mapped.max(1)).astype(int) + 1, 1, np.array(shape))
    return start.tolist(), (end - start).tolist()
