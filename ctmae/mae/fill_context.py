"""What a ``fill_sigma`` decoder knows of the trivial fill: the fill it adds its output to and, with
``fill_queries``, the fills and the visible support around each predicted patch at several widths, read by that
patch's query.

A plain MAE query is a mask token plus a position: to correct an interpolation it would first have to rebuild it
from the visible tokens through attention. With ``fill_queries`` each query also carries its patch's normalised
gaussian fills ``G*(x·m) / G*m`` and supports ``G*m`` (how much visible tissue lies within reach) at the widths in
``QUERY_SIGMAS``: the decoder can learn where to trust which width and what no fill guesses (edges, the body
outline), while the encoder supplies the context. Everything is computed on a grid ``POOL`` times coarser than the
voxels (the fills are smooth at these widths), where the 15 gaussian passes cost a few milliseconds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter
from monai.networks.layers.convutils import gaussian_1d
from torch import nn

from ctmae.mae.config import ModelConfig

QUERY_SIGMAS = (2.0, 4.0, 8.0, 16.0)  # voxels: the fill widths a query reads
POOL = 4  # the maps' grid is this many times coarser than the voxels
TRUNCATED = 4.0  # each gaussian's kernel reaches this many sigmas (MONAI's default)


def pool_factor(patch: int) -> int:
    """Coarsening of the maps' grid: ``POOL`` where it divides the patch, else none."""
    return POOL if patch % POOL == 0 else 1


def cells_to_voxels(cells: torch.Tensor, edge: int) -> torch.Tensor:
    """A map over cells (..., gx, gy, gz) on the voxels they cover: (..., gx·edge, gy·edge, gz·edge)."""
    for axis in (-3, -2, -1):
        cells = cells.repeat_interleave(edge, dim=axis)
    return cells


def visible_voxels(ids_keep: torch.Tensor, grid: tuple[int, int, int], patch: int, like: torch.Tensor) -> torch.Tensor:
    """0/1 map (B, 1, D, H, W) of the voxels of the tokens ``ids_keep`` (B, Lv) on a ``grid`` of ``patch``³ cells,
    with the dtype and device of ``like``."""
    b = ids_keep.shape[0]
    seen = torch.zeros(b, 1, grid[0] * grid[1] * grid[2], device=like.device, dtype=like.dtype)
    seen = seen.scatter_(2, ids_keep[:, None], 1.0).view(b, 1, *grid)  # (B, 1, gd, gh, gw)
    return cells_to_voxels(seen, patch)  # (B, 1, D, H, W)


def fill_reach(sigmas: tuple[float, ...], patch: int) -> int:
    """Voxels around a region beyond which nothing changes ``fill_maps``' fills and supports inside it (the widest
    kernel's half-length on the coarse grid), a multiple of the coarsening."""
    f = pool_factor(patch)
    return max((len(gaussian_1d(torch.tensor(s / f), truncated=TRUNCATED)) - 1) // 2 for s in sigmas) * f


def coarse_sums(images: torch.Tensor, visible: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the fallback of ``fill_maps`` averages, summed per sample on the coarse grid: (visible intensity, visible
    share), each (B, 1, 1, 1, 1). Sums of parts add up to the sums of the whole."""
    f = pool_factor(patch)
    return _sums(F.avg_pool3d(images[:, :1], f), F.avg_pool3d(visible, f))


def _sums(values: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``coarse_sums`` of coarse maps (B, 1, d, h, w) already pooled."""
    return (values * seen).sum((2, 3, 4), keepdim=True), seen.sum((2, 3, 4), keepdim=True)


def fill_maps(
    images: torch.Tensor,
    visible: torch.Tensor,
    sigmas: tuple[float, ...],
    patch: int,
    sums: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Gaussian fills of the first channel of ``images`` (B, C, D, H, W) from the ``visible`` voxels (B, 1, D, H, W)
    and their supports, on the coarse grid: (B, 2·S, D/f, H/f, W/f), channels [fill, support] per sigma (voxels).
    Where no visible voxel is within reach the fill is the mean of the visible ones (per sample): of these images,
    or of a larger volume whose ``coarse_sums`` are given (these images then being a part of it that reaches
    ``fill_reach`` beyond where the maps are read, the maps there are those of the whole volume)."""
    f = pool_factor(patch)
    values, seen = F.avg_pool3d(images[:, :1], f), F.avg_pool3d(visible, f)  # (B, 1, d, h, w)
    total, share = sums if sums is not None else _sums(values, seen)
    mean = total / share.clamp_min(1e-6)
    maps = []
    for sigma in sigmas:
        smoothed = GaussianFilter(3, sigma / f, TRUNCATED).to(images.device)(torch.cat([values * seen, seen], dim=1))
        num, den = smoothed[:, :1], smoothed[:, 1:]
        maps += [torch.where(den > 1e-6, num / den.clamp_min(1e-12), mean), den]
    return torch.cat(maps, dim=1)


def to_voxels(coarse: torch.Tensor, patch: int) -> torch.Tensor:
    """A coarse map (B, C, d, h, w) of ``fill_maps`` back on the voxel grid, trilinear: (B, C, D, H, W)."""
    f = pool_factor(patch)
    return F.interpolate(coarse, scale_factor=f, mode="trilinear") if f > 1 else coarse


def per_patch(maps: torch.Tensor, patch: int) -> torch.Tensor:
    """Coarse maps (B, C, d, h, w) grouped by token: (B, L, C·q³) with q = patch / f, tokens in raster order."""
    b, c, d, h, w = maps.shape
    q = patch // pool_factor(patch)  # coarse cells per patch edge
    maps = maps.reshape(b, c, d // q, q, h // q, q, w // q, q).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return maps.reshape(b, (d // q) * (h // q) * (w // q), c * q**3)


def from_patches(tokens: torch.Tensor, grid: tuple[int, int, int], channels: int) -> torch.Tensor:
    """The inverse of ``per_patch``: (B, L, C·q³) on a token ``grid`` -> (B, C, gd·q, gh·q, gw·q)."""
    b, q = tokens.shape[0], round((tokens.shape[-1] // channels) ** (1 / 3))
    x = tokens.reshape(b, *grid, channels, q, q, q).permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, gd, q, gh, q, gw, q)
    return x.reshape(b, channels, grid[0] * q, grid[1] * q, grid[2] * q)


class FillQueries(nn.Module):
    """Embeds a predicted patch's maps (fills and supports at ``QUERY_SIGMAS``) into the decoder's width, added to
    its query."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cells = (cfg.patch // pool_factor(cfg.patch)) ** 3
        self.embed = nn.Linear(2 * len(QUERY_SIGMAS) * cells, cfg.dec_dim)

    def forward(self, maps: torch.Tensor, ids_pred: torch.Tensor, patch: int) -> torch.Tensor:
        """Coarse ``maps`` (B, 2·S, d, h, w) of ``fill_maps`` at ``QUERY_SIGMAS`` -> (B, Lp, Dd) at ``ids_pred``."""
        features = per_patch(maps, patch)  # (B, L, F)
        features = torch.gather(features, 1, ids_pred[..., None].expand(-1, -1, features.shape[-1]))
        return self.embed(features)
