"""Token-level masks (block, random, none) and the voxel corruption of the denoising mode (noise).

Masks are drawn on the training device from an explicit ``torch.Generator`` with no host synchronisation. Every
sample of a batch hides exactly the same number of tokens, so the encoder runs batched without padding. The loss
covers a random subset of the hidden tokens (``MaskConfig.predict_ratio``, CrossMAE's prediction ratio): the
decoder's queries do not attend to each other, so predicting a subset costs proportionally less and gives exactly
the subset of the full prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctmae.mae.config import MaskConfig


@dataclass(frozen=True)
class TokenMask:
    """Which tokens the encoder sees and which the loss is computed on; token index = raster order over the grid."""

    ids_keep: torch.Tensor  # (B, Lv) int64, sorted: tokens given to the encoder
    ids_pred: torch.Tensor  # (B, Lp) int64, sorted: hidden tokens the decoder predicts and the loss covers
    mask: torch.Tensor  # (B, L) bool, True where a token is hidden from the encoder


def num_masked(cfg: MaskConfig, num_tokens: int) -> int:
    """Tokens hidden per sample: the requested ratio rounded to whole tokens (0 for none/noise)."""
    if cfg.kind in ("none", "noise"):
        return 0
    return min(num_tokens - 1, max(1, round(cfg.ratio * num_tokens)))


def num_predicted(cfg: MaskConfig, num_tokens: int) -> int:
    """Tokens the loss covers per sample: ``predict_ratio`` of all tokens, at most the hidden ones (every token for
    none/noise, whose encoder sees everything)."""
    candidates = num_masked(cfg, num_tokens) or num_tokens
    return min(candidates, max(1, round(cfg.predict_ratio * num_tokens)))


def sample_mask(
    cfg: MaskConfig, batch: int, grid: tuple[int, int, int], generator: torch.Generator, device: torch.device
) -> TokenMask:
    """Draw one mask per sample.

    Args:
        cfg: mask kind, ratio and block edge.
        batch: number of samples B.
        grid: tokens along each axis (gd, gh, gw); L = gd * gh * gw.
        generator: seeded generator living on ``device``.
        device: where the mask tensors are created.
    """
    num_tokens = grid[0] * grid[1] * grid[2]
    n_mask = num_masked(cfg, num_tokens)
    if n_mask == 0:  # none / noise: the encoder sees everything; the loss covers a subset of all tokens
        ids = torch.arange(num_tokens, device=device).expand(batch, num_tokens)
        hidden = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
        return TokenMask(ids, _subset(ids, num_predicted(cfg, num_tokens), generator), hidden)
    if cfg.kind == "block":
        score = _block_scores(batch, grid, cfg.block, generator, device)
    else:
        score = torch.rand(batch, num_tokens, generator=generator, device=device)
    order = torch.argsort(score, dim=1)  # lowest scores are masked
    ids_masked = order[:, :n_mask]  # (B, n_mask)
    ids_keep = order[:, n_mask:].sort(dim=1).values
    mask = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device).scatter_(1, ids_masked, True)
    return TokenMask(ids_keep, _subset(ids_masked, num_predicted(cfg, num_tokens), generator), mask)


def _subset(ids: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` of each row's ``ids`` (B, M) drawn uniformly, sorted: (B, n); the row itself, sorted, when n == M."""
    if n < ids.shape[1]:
        pick = torch.rand(ids.shape, generator=generator, device=ids.device).argsort(dim=1)[:, :n]  # (B, n)
        ids = torch.gather(ids, 1, pick)
    return ids.sort(dim=1).values


def _block_scores(
    batch: int, grid: tuple[int, int, int], block: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Per-token scores that order whole cuboids of block³ tokens: rank of the token's cell + a value in [0, 1).

    Cells tile the grid with a random offset per sample and axis, so cuboid borders are not tied to a fixed lattice
    and border cells are clipped. Masking the lowest n scores hides complete cells and, to hit n exactly, part of one.
    Returns (B, L).
    """
    offsets = torch.randint(0, block, (batch, 3), generator=generator, device=device)  # (B, 3)
    cells = [(g + block - 1) // block + 1 for g in grid]  # cells per axis, enough for any offset
    cell_idx = []
    for axis, g in enumerate(grid):
        cell_idx.append((torch.arange(g, device=device)[None] + offsets[:, axis : axis + 1]) // block)  # (B, g)
    flat_cell = (
        cell_idx[0][:, :, None, None] * (cells[1] * cells[2])
        + cell_idx[1][:, None, :, None] * cells[2]
        + cell_idx[2][:, None, None, :]
    ).reshape(batch, -1)  # (B, gd, gh, gw) -> (B, L)
    n_cells = cells[0] * cells[1] * cells[2]
    cell_rank = torch.argsort(torch.rand(batch, n_cells, generator=generator, device=device), dim=1).argsort(dim=1)
    within = torch.rand(flat_cell.shape, generator=generator, device=device)  # breaks the tie inside a cell
    return torch.gather(cell_rank, 1, flat_cell).to(within.dtype) + within


def corrupt(images: torch.Tensor, cfg: MaskConfig, generator: torch.Generator) -> torch.Tensor:
    """The encoder's input: gaussian noise added to every voxel for ``noise``, the images unchanged otherwise."""
    if cfg.kind != "noise":
        return images
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return images + cfg.noise_std * noise
