"""Objects smaller than a mask block: labelled object sizes against the block edge, and how often one mask hides an
object entirely.

MAE learns little about an object that a single mask block covers whole: the encoder never sees any of it, and the
decoder can only guess it from the surroundings. Given label maps, ``check_masking`` measures every labelled object
(connected components per class, SimpleITK), in millimetres, and estimates by simulation the share of objects that
one mask of the given settings hides entirely: the object is placed at a uniformly random position in a crop's token
grid (at a random sub-patch offset) and a mask is drawn with ``ctmae.mae.masking.sample_mask``, many times. It
recommends the largest block edge whose share stays within a tolerance of block 1's: a mask of ratio r hides any
object within one token with probability about r whatever the block, so block 1 is the floor to compare with.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from ctmae.draw.glyphs import draw_text
from ctmae.io.checks import InputError
from ctmae.io.discovery import VolumeSource
from ctmae.io.volume import read_volume
from ctmae.mae.config import RunConfig
from ctmae.mae.masking import sample_mask
from ctmae.runtime.files import atomic_path

DRAWS = 256  # simulated masks per object
HIDDEN_TINT = np.array([200, 60, 60], dtype=np.float64)


def object_sizes(source: VolumeSource) -> list[dict[str, Any]]:
    """Connected components of each class of a label map: class, voxels, bounding-box extent (mm, RAS axes order of
    the file's voxel axes) and equivalent sphere diameter (mm)."""
    array, affine = read_volume(source)  # (X, Y, Z)
    if (array < 0).any() or (array != np.round(array)).any():
        raise InputError(f"{source.label}: label values must be class indices 0, 1, 2, ...")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    objects = []
    for cls in sorted(int(c) for c in np.unique(array) if c > 0):
        mask = sitk.GetImageFromArray((array == cls).astype(np.uint8).T)  # (X, Y, Z) -> ITK's (Z, Y, X) buffer
        mask.SetSpacing(spacing.tolist())
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(sitk.ConnectedComponent(mask, True))  # fully connected (26-neighbourhood)
        for label in stats.GetLabels():
            box = stats.GetBoundingBox(label)  # (x, y, z, sx, sy, sz) in voxels
            objects.append(
                {
                    "class": cls,
                    "voxels": int(stats.GetNumberOfPixels(label)),
                    "extent_mm": [round(float(n * s), 2) for n, s in zip(box[3:], spacing)],
                    "diameter_mm": round(2 * float(stats.GetEquivalentSphericalRadius(label)), 2),
                    "center_voxel": [int(b + n // 2) for b, n in zip(box[:3], box[3:])],
                }
            )
    return objects


def hidden_share(extents_mm: np.ndarray, cfg: RunConfig, seed: int = 0, draws: int = DRAWS) -> np.ndarray:
    """Per object, the share of simulated masks that hide all of it.

    Args:
        extents_mm: (N, 3) object extents in mm.
        cfg: crop, patch, spacing and mask settings (block, ratio, kind).
        seed: seeds the positions and the masks.
        draws: masks simulated per object.
    """
    grid, token_mm = cfg.model.grid, cfg.model.patch * np.asarray(cfg.preprocess.spacing)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    shares = np.zeros(len(extents_mm))
    for i, extent in enumerate(np.asarray(extents_mm, dtype=np.float64)):
        hidden = sample_mask(cfg.mask, draws, (grid,) * 3, gen, torch.device("cpu")).mask.view(draws, grid, grid, grid)
        length = extent / token_mm  # object length in tokens, per axis
        covered = np.minimum(np.ceil(length + rng.random((draws, 3))), grid).astype(int)  # tokens it touches
        start = (rng.random((draws, 3)) * (grid - covered + 1)).astype(int)
        whole = [
            bool(hidden[d, s[0] : s[0] + c[0], s[1] : s[1] + c[1], s[2] : s[2] + c[2]].all())
            for d, (s, c) in enumerate(zip(start, covered))
        ]
        shares[i] = float(np.mean(whole))
    return shares


def check_masking(
    labels: Sequence[VolumeSource], cfg: RunConfig, tolerance: float = 0.1, seed: int = 0
) -> dict[str, Any]:
    """Object sizes, the block edge in mm, the share of objects one mask hides entirely, and the largest block that
    keeps that share within ``tolerance`` of block 1's.

    Raises:
        InputError: a label map is unreadable or holds no labelled voxel.
    """
    objects = []
    for source in labels:
        found = object_sizes(source)
        if not found:
            raise InputError(f"{source.label}: holds no labelled voxel")
        objects += [{"label": source.id, **o} for o in found]
    extents = np.array([o["extent_mm"] for o in objects])
    by_block = {}
    for block in range(1, cfg.model.grid + 1):
        trial = cfg.replace(mask={"block": block})
        by_block[block] = float(hidden_share(extents, trial, seed).mean()) if trial.mask.kind == "block" else 0.0
    shares = hidden_share(extents, cfg, seed)
    for o, share in zip(objects, shares):
        o["hidden_share"] = round(float(share), 4)
    fitting = [b for b, share in by_block.items() if share <= by_block[1] + tolerance]
    return {
        "mask": dataclasses.asdict(cfg.mask),
        "crop": cfg.preprocess.crop,
        "patch": cfg.model.patch,
        "spacing_mm": list(cfg.preprocess.spacing),
        "block_edge_mm": [cfg.mask.block * cfg.model.patch * s for s in cfg.preprocess.spacing],
        "objects": objects,
        "hidden_share": float(shares.mean()),
        "hidden_share_by_block": by_block,
        "tolerance": tolerance,
        "recommended_block": max(fitting),
    }


def write_overlay(
    path: str | os.PathLike, source: VolumeSource, obj: dict[str, Any], cfg: RunConfig, seed: int
) -> None:
    """A PNG of one labelled slice (axial, through ``obj``'s centre) with one mask's hidden tokens tinted red.

    The mask is drawn on a crop-sized token grid centred on the object, each token ``patch x spacing`` mm wide,
    drawn in the label's own voxels; the label is white, the rest black.
    """
    array, affine = read_volume(source)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    z = obj["center_voxel"][2]
    slice_ = (array[:, :, z] > 0).astype(np.float64).T  # (Y, X): rows along y
    grid = cfg.model.grid
    hidden = sample_mask(cfg.mask, 1, (grid,) * 3, torch.Generator().manual_seed(seed), torch.device("cpu"))
    hidden = hidden.mask.view(grid, grid, grid)[:, :, grid // 2].numpy()  # (gx, gy) at the object's depth
    token_vox = cfg.model.patch * np.asarray(cfg.preprocess.spacing)[:2] / spacing[:2]  # voxels per token in x, y
    ys, xs = np.mgrid[0 : slice_.shape[0], 0 : slice_.shape[1]]
    gx = np.floor((xs - obj["center_voxel"][0]) / token_vox[0] + grid / 2).astype(int)
    gy = np.floor((ys - obj["center_voxel"][1]) / token_vox[1] + grid / 2).astype(int)
    inside = (gx >= 0) & (gx < grid) & (gy >= 0) & (gy < grid)
    tint = np.zeros(slice_.shape, dtype=bool)
    tint[inside] = hidden[gx[inside], gy[inside]]
    rgb = np.repeat(slice_[..., None] * 255, 3, axis=2)
    rgb[tint] = 0.5 * rgb[tint] + 0.5 * HIDDEN_TINT
    scale = max(1, -(-384 // max(slice_.shape)))  # at least 384 pixels along the longer edge
    rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1).round().astype(np.uint8)
    band = np.full((14, rgb.shape[1], 3), 40, dtype=np.uint8)
    image = np.concatenate([band, rgb])
    draw_text(
        image, f"label white; block {cfg.mask.block}, ratio {cfg.mask.ratio:g}: hidden red", 2, 3, (235, 235, 235)
    )
    with atomic_path(path) as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(image, isVector=True), str(tmp))
