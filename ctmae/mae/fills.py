"""Trivial fills of hidden voxels from the visible ones: the floor a masked autoencoder has to beat.

A normalised gaussian convolution ``G*(x·m) / G*m`` spreads the visible voxels ``m`` into the holes (smooth
interpolation); where no visible voxel is within reach, the mean of the visible voxels stands in. ``best_fill`` tries
each width in ``SIGMAS`` and keeps the one with the lowest error on the hidden voxels of the very scan being scored:
an optimistic floor, chosen with the answer in hand, which a model's reconstruction never is.
"""

from __future__ import annotations

import torch
from monai.networks.layers import GaussianFilter

SIGMAS = (1.0, 2.0, 4.0, 8.0)  # gaussian fill widths in voxels


def gaussian_fill(values: torch.Tensor, visible: torch.Tensor, sigma: float) -> torch.Tensor:
    """Fill of (B, 1, X, Y, Z) ``values`` from the voxels where ``visible`` (same shape, 0/1) is 1; same shape."""
    dims = tuple(range(1, values.dim()))
    mean = (values * visible).sum(dims, keepdim=True) / visible.sum(dims, keepdim=True).clamp_min(1.0)  # per sample
    smoothed = GaussianFilter(3, sigma).to(values.device)(torch.cat([values * visible, visible], dim=1))  # (B, 2, ...)
    num, den = smoothed[:, :1], smoothed[:, 1:]
    return torch.where(den > 1e-6, num / den.clamp_min(1e-12), mean)  # far from any visible voxel: the mean


def best_fill(values: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The gaussian fill of the hidden voxels with the width in ``SIGMAS`` that errs least on them.

    Args:
        values: (B, 1, X, Y, Z) the true voxels, no padding (its zeros would pass for air at the scan's edge); only
            the visible ones enter the fill.
        hidden: (B, 1, X, Y, Z) 0/1, the voxels to fill and to score.

    Returns:
        The fill (B, 1, X, Y, Z) and its sigma in voxels.
    """
    visible, target = 1.0 - hidden, hidden
    best: tuple[float, torch.Tensor, float] | None = None
    for sigma in SIGMAS:
        fill = gaussian_fill(values, visible, sigma)
        sse = float((((fill - values) * target) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, fill, sigma)
    assert best is not None
    return best[1], best[2]
