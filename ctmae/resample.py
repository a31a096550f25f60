"""Resampling onto the grid of MONAI's Orientationd → Spacingd, executed by SimpleITK in one pass.

MONAI's transforms, run lazily, decide the output grid (shape and RAS affine) without touching a voxel; SimpleITK's
multithreaded ResampleImageFilter then interpolates straight from the stored pixel type (e.g. int16) to float32.
This skips the float32 copy of the whole input, the flips and MONAI's grid_sample over the full-resolution grid.
The sampling matches Spacingd's bilinear mode with ``align_corners=False`` and ``padding_mode="border"``: both
interpolate linearly between voxel centres, and the nearest-neighbour extrapolator repeats the border voxels.
"""

from __future__ import annotations

from collections.abc import Sequence

import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from ctmae.io import itk_grid, ras_affine


def resample_to_grid(image: sitk.Image, steps: Sequence[MapTransform]) -> MetaTensor:
    """Resample a 3D scalar image onto the grid that ``steps`` would produce.

    Args:
        image: a checked volume from ``CTReader.read``.
        steps: MONAI dictionary transforms on key "image" built with ``lazy=True`` (e.g. Orientationd, Spacingd),
            applied one by one to a stand-in of the image's shape and affine to find the output grid. Not a
            ``Compose``: it would carry out the pending operations at its end.

    Returns:
        MetaTensor (1, X, Y, Z) float32 whose ``affine`` is the output grid's RAS affine.
    """
    size = tuple(image.GetSize())  # (X, Y, Z)
    stand_in = MetaTensor(torch.zeros(()).expand(1, *size), affine=torch.as_tensor(ras_affine(image)))  # no memory
    planned = {"image": stand_in}
    for step in steps:
        planned = step(planned)
    planned = planned["image"]
    affine = planned.peek_pending_affine().to(torch.float64)
    shape = [int(n) for n in planned.peek_pending_shape()]  # (X, Y, Z)
    origin, spacing, direction = itk_grid(affine.numpy())
    resampled = sitk.Resample(
        image,
        shape,
        sitk.Transform(),
        sitk.sitkLinear,
        origin,
        spacing,
        direction,
        0.0,
        sitk.sitkFloat32,
        True,  # useNearestNeighborExtrapolator: Spacingd's padding_mode="border"
    )
    array = sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)  # (Z, Y, X) -> (X, Y, Z), a view in Fortran order
    return MetaTensor(torch.from_numpy(array)[None], affine=affine)  # (1, X, Y, Z)
