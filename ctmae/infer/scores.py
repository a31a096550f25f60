"""Reconstruct's figures: the errors of a reconstruction and of the gaussian fill on the hidden voxels, in HU
window units (0..1, PSNR peak 1), and the SSIM of the whole volume (``ctmae.infer.reconstruct`` defines them)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric


def figures(
    recon: np.ndarray,
    original: np.ndarray,
    model_hu: np.ndarray,
    hidden: np.ndarray,
    inside: np.ndarray,
    window: tuple[float, float],
) -> dict[str, Any]:
    """Voxel counts and errors as reconstruct's ``DEFINITIONS`` state them; all (X, Y, Z) on the source grid, HU
    or bool."""
    lo, hi = window
    return {
        "units": "errors in scaled intensity: HU window mapped to 0..1 (PSNR peak 1)",
        "hu_window": [lo, hi],
        "voxels": int(hidden.size),
        "field_of_view_voxels": int(inside.sum()),
        "mask_ratio": float(hidden.sum() / max(inside.sum(), 1)),
        "masked": _score(recon, original, hidden, lo, hi),
        "visible": _score(recon, original, ~hidden, lo, hi),
        "model_on_visible": _score(model_hu, original, inside & ~hidden, lo, hi),
    }


def fill_score(
    fill: np.ndarray,
    sigma: float | None,
    original: np.ndarray,
    hidden: np.ndarray,
    window: tuple[float, float],
    masked_psnr: float | None,
) -> dict[str, Any]:
    """The gaussian fill's error on the hidden voxels and the reconstruction's PSNR minus the fill's (dB); nulls
    when nothing is hidden (``none``/``noise`` strategies)."""
    if sigma is None:
        return {"sigma_voxels": None, "voxels": 0, "mse": None, "psnr": None, "masked_minus_fill_db": None}
    lo, hi = window
    score = _score(np.clip(fill, 0.0, 1.0) * (hi - lo) + lo, original, hidden, lo, hi)
    versus = None if masked_psnr is None or score["psnr"] is None else masked_psnr - score["psnr"]
    return {"sigma_voxels": sigma, **score, "masked_minus_fill_db": versus}


def _score(values: np.ndarray, original: np.ndarray, where: np.ndarray, lo: float, hi: float) -> dict[str, Any]:
    """Voxel count, MSE and PSNR of ``values`` against ``original`` (HU) on the voxels ``where``, in 0..1 units.

    PSNR is null when there are no voxels or the MSE is 0 (infinite).
    """
    n = int(where.sum())
    if n == 0:
        return {"voxels": 0, "mse": None, "psnr": None}
    pred = torch.from_numpy((values[where] - lo) / (hi - lo)).view(1, 1, n)
    true = torch.from_numpy((original[where] - lo) / (hi - lo)).view(1, 1, n)
    mse = float(((pred - true) ** 2).mean())
    psnr = float(PSNRMetric(max_val=1.0)(pred, true).item()) if mse > 0 else math.inf
    return {"voxels": n, "mse": mse, "psnr": psnr if math.isfinite(psnr) else None}


def ssim(recon: np.ndarray, original: np.ndarray, lo: float, hi: float, device: torch.device) -> float:
    """SSIM of reconstruction vs input over the whole volume (0..1 units), on the model's device.

    MONAI convolves with a full (not separable) Gaussian kernel, so a 7³ window (sigma 1.5, nearly all of its
    weight) stands in for 2D SSIM's 11² at a quarter of the cost; it shrinks for thinner volumes.
    """
    win = min(7, min(recon.shape) - (1 - min(recon.shape) % 2))  # odd and no larger than the thinnest axis
    a, b = (torch.from_numpy((v - lo) / (hi - lo))[None, None].to(device) for v in (recon, original))
    return float(SSIMMetric(spatial_dims=3, data_range=1.0, win_size=win)(a, b).item())
