"""What reconstruct and embed share: the checkpoint's model on a device, one preprocessed volume, patch-aligned
sliding windows over it, and the way back to the source scan's grid.

Windows are crop-sized and start on multiples of the patch size (the volume is padded at its far end to whole
patches), so a token is the same patch of voxels in every window that holds it: token maps and token masks stitch
together without resampling.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Compose

from ctmae.io.checks import InputError
from ctmae.io.discovery import VolumeSource
from ctmae.mae.checkpoint import load_checkpoint, model_from_checkpoint
from ctmae.mae.config import RunConfig
from ctmae.mae.model import MaskedAutoencoder3D
from ctmae.runtime.checkpoint import CheckpointError
from ctmae.runtime.device import resolve_device


@dataclass
class LoadedModel:
    """A checkpoint's model in eval mode on its device, with the run config and the step it was saved at."""

    model: MaskedAutoencoder3D  # for embed also an export's encoder alone (ctmae.share.load.ExportedEncoder)
    cfg: RunConfig
    step: int
    device: torch.device
    shift_reference: dict | None = None  # the training scans' feature statistics (ctmae.mae.shift), if stored


def load_model(checkpoint: str | os.PathLike, device: str) -> LoadedModel:
    """Load a ctmae checkpoint (CheckpointError one-liners for bad files) and move its model to ``device``.

    Args:
        checkpoint: a ``.pt`` written by ``ctmae pretrain``.
        device: auto | cpu | cuda (ValueError when CUDA is asked for and absent).
    """
    if os.path.isdir(checkpoint):
        raise CheckpointError(
            f"{checkpoint}: a folder; pass the MAE checkpoint (.pt) written by ctmae pretrain (an export folder from "
            "ctmae export holds the encoder alone, without the decoder this needs)"
        )
    state = load_checkpoint(checkpoint)
    dev = resolve_device(device)
    model = model_from_checkpoint(state).to(dev).eval()
    return LoadedModel(model, state["config"], int(state.get("step", 0)), dev, state.get("shift_reference"))


def preprocess(source: VolumeSource, transform: Compose) -> MetaTensor:
    """Run the checkpoint's preprocessing on one volume: (1, X, Y, Z) in 0..1, carrying its applied operations.

    Raises:
        InputError: one line naming the file and what is wrong (MONAI wraps reader errors in chains).
    """
    try:
        return transform({"image": list(source.files)})["image"]
    except InputError:
        raise
    except Exception as e:
        while e.__cause__ is not None:
            e = e.__cause__
        if isinstance(e, InputError):
            raise e from None
        raise InputError(f"{source.label}: could not preprocess: {str(e).splitlines()[0]}") from None


def pad_to_patches(volume: torch.Tensor, patch: int, minimum: int = 0, mode: str = "constant") -> torch.Tensor:
    """Pad (C, X, Y, Z) at the far end of each axis to whole patches and at least ``minimum`` voxels (a multiple
    of ``patch``): with zeros, the window minimum (air), or with ``mode="replicate"`` by repeating the edge voxels."""
    pads = []
    for size in reversed(volume.shape[1:]):  # F.pad lists the last axis first
        pads += [0, max(-size % patch, minimum - size)]
    return F.pad(volume, pads, mode=mode)


def patch_aligned_overlap(crop: int, patch: int) -> float:
    """Overlap for MONAI's sliding window giving a stride of about 3/4 of a crop (MONAI's default 0.25 overlap),
    rounded to whole patches.

    MONAI's stride is ``int(crop * (1 - overlap))``; the half-voxel margin keeps float rounding from landing one
    voxel short of the intended multiple of ``patch``.
    """
    return window_overlap(crop, default_window_step(crop, patch))


def default_window_step(crop: int, patch: int) -> int:
    """About 3/4 of a crop in whole patches (a crop of two patches steps by whole crops: no overlap)."""
    return max(1, round(0.75 * (crop // patch))) * patch


def window_overlap(crop: int, step: int) -> float:
    """The overlap for MONAI's sliding window that steps by ``step`` voxels (the half voxel: see above)."""
    return max(0.0, 1.0 - (step + 0.5) / crop)


def window_tokens(slices: list[slice], patch: int) -> tuple[slice, slice, slice]:
    """The token-grid slices a window covers, from MONAI's voxel slices [batch, channel, x, y, z]."""
    spatial = slices[2:]
    assert all(s.start % patch == 0 for s in spatial), "sliding windows must start on the patch grid"
    return tuple(slice(s.start // patch, s.stop // patch) for s in spatial)


def to_source_grid(channels: torch.Tensor, reference: MetaTensor, transform: Compose) -> np.ndarray:
    """Bring preprocessed-grid channels back to the source scan's grid by inverting the preprocessing.

    Args:
        channels: (C, X, Y, Z) on the preprocessed grid of ``reference`` (extra patch padding already removed).
        reference: the preprocessed image whose applied operations (orientation, resampling, crop, pad) to undo.
        transform: the Compose that produced ``reference``.

    Returns:
        (C, X0, Y0, Z0) float32 on the source grid. Voxels the foreground crop removed come back as 0; resampling
        is linear, so a channel of ones marks how much of each source voxel the preprocessed grid covered.
    """
    meta: dict[str, Any] = dict(reference.meta)
    out = MetaTensor(channels.detach().to("cpu", torch.float32), meta=meta)
    out.applied_operations = [dict(op) for op in reference.applied_operations]  # inverse pops these
    return transform.inverse({"image": out})["image"].numpy().astype(np.float32, copy=False)


def token_affine(voxel_affine: np.ndarray, patch: int) -> np.ndarray:
    """RAS affine of a token grid: token (a, b, c) -> centre of the patch of voxels it encodes."""
    scale = np.diag([patch, patch, patch, 1.0]).astype(np.float64)
    scale[:3, 3] = (patch - 1) / 2.0
    return np.asarray(voxel_affine, dtype=np.float64) @ scale


def source_geometry(image: MetaTensor) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Shape and voxel spacing (mm) of the scan ``image`` was preprocessed from, as the reader saw it."""
    shape = tuple(int(n) for n in np.asarray(image.meta["spatial_shape"]).tolist())
    spacing = np.linalg.norm(np.asarray(image.meta["original_affine"], dtype=np.float64)[:3, :3], axis=0)
    return shape, tuple(float(s) for s in spacing)
