"""The masking registry: each strategy is one registered ``MaskStrategy``, found by ``MaskConfig.kind``.

A strategy either hides tokens (``scores``: per-token scores, the lowest ``num_masked`` of each sample are hidden)
or corrupts voxels (``corrupt``: the encoder's input), or both. Built in: ``block`` (cuboids of block³ tokens),
``random`` (independent tokens), ``none`` (identity, plain autoencoder) and ``noise`` (gaussian noise on every voxel,
denoising autoencoder). Config validation, the CLIs' ``--mask`` help and ``reconstruct`` read ``MASKS``, so a new
strategy is one ``register`` call.

Masks are drawn on the training device from an explicit ``torch.Generator`` with no host synchronisation. Every
sample of a batch hides exactly the same number of tokens, so the encoder runs batched without padding. The loss
covers a random subset of the hidden tokens (``MaskConfig.predict_ratio``, CrossMAE's prediction ratio): the
decoder's queries do not attend to each other, so predicting a subset costs proportionally less and gives exactly
the subset of the full prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MaskConfig:
    """The ``mask`` section of a run's config (``ctmae.mae.config.RunConfig``), kept here beside the registry
    its ``kind`` names, so that config validation can read ``MASKS`` without an import cycle."""

    kind: str = "block"  # a strategy in MASKS: block | random | none (identity) | noise (denoising)
    ratio: float = 0.75  # share of tokens hidden from the encoder (strategies that hide tokens: block, random)
    block: int = 2  # block masking hides cuboids of block x block x block patches
    noise_std: float = 0.1  # std of the gaussian added to every voxel (noise), in scaled 0..1 intensity units
    # share of all tokens the decoder predicts and the loss covers: a random subset of the hidden tokens, capped at
    # all of them (CrossMAE's prediction ratio; 0.25 of 0.75 hidden reconstructs a third of them per step)
    predict_ratio: float = 0.25


# (cfg, batch B, grid (gd, gh, gw), generator, device) -> (B, L) scores; the lowest num_masked per sample are hidden
ScoreFn = Callable[[MaskConfig, int, tuple[int, int, int], torch.Generator, torch.device], torch.Tensor]
# (images (B, C, D, H, W), cfg, generator) -> the encoder's input, same shape
CorruptFn = Callable[[torch.Tensor, MaskConfig, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class MaskStrategy:
    """One masking strategy, registered under ``name`` (the value of ``MaskConfig.kind`` and ``--mask``)."""

    name: str
    description: str  # one line saying what the encoder is shown
    scores: ScoreFn | None = None  # token-hiding strategies: which tokens to hide (lowest scores first)
    corrupt: CorruptFn | None = None  # voxel corruption applied to the encoder's input, or None
    uses_ratio: bool = False  # MaskConfig.ratio applies (and must lie strictly between 0 and 1)

    def __post_init__(self) -> None:
        if self.scores is not None and not self.uses_ratio:
            raise ValueError(f"mask strategy {self.name!r}: a token-hiding strategy hides MaskConfig.ratio of tokens")

    @property
    def hides_tokens(self) -> bool:
        """The encoder sees a subset of the tokens; otherwise it sees all of them and the loss covers a subset."""
        return self.scores is not None


MASKS: dict[str, MaskStrategy] = {}


def register(strategy: MaskStrategy) -> MaskStrategy:
    """Add ``strategy`` to ``MASKS`` under its name; ValueError if the name is taken."""
    if strategy.name in MASKS:
        raise ValueError(f"mask strategy {strategy.name!r} is already registered")
    MASKS[strategy.name] = strategy
    return strategy


def unregister(name: str) -> None:
    """Remove a registered strategy (tests register toy strategies and remove them again)."""
    MASKS.pop(name, None)


def strategy(cfg: MaskConfig) -> MaskStrategy:
    """The registered strategy ``cfg.kind`` names; ValueError listing the known ones otherwise."""
    if cfg.kind not in MASKS:
        raise ValueError(f"unknown mask kind {cfg.kind!r}; choose one of {', '.join(MASKS)}")
    return MASKS[cfg.kind]


@dataclass(frozen=True)
class TokenMask:
    """Which tokens the encoder sees and which the loss is computed on; token index = raster order over the grid."""

    ids_keep: torch.Tensor  # (B, Lv) int64, sorted: tokens given to the encoder
    ids_pred: torch.Tensor  # (B, Lp) int64, sorted: hidden tokens the decoder predicts and the loss covers
    mask: torch.Tensor  # (B, L) bool, True where a token is hidden from the encoder


def num_masked(cfg: MaskConfig, num_tokens: int) -> int:
    """Tokens hidden per sample: the requested ratio rounded to whole tokens (0 for strategies hiding none)."""
    if not strategy(cfg).hides_tokens:
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
    score = strategy(cfg).scores(cfg, batch, grid, generator, device)  # (B, L)
    order = torch.argsort(score, dim=1)  # lowest scores are masked
    ids_masked = order[:, :n_mask]  # (B, n_mask)
    ids_keep = order[:, n_mask:].sort(dim=1).values
    mask = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device).scatter_(1, ids_masked, True)
    return TokenMask(ids_keep, _subset(ids_masked, num_predicted(cfg, num_tokens), generator), mask)


def corrupt(images: torch.Tensor, cfg: MaskConfig, generator: torch.Generator) -> torch.Tensor:
    """The encoder's input: the strategy's voxel corruption (e.g. noise), or the images unchanged."""
    fn = strategy(cfg).corrupt
    return images if fn is None else fn(images, cfg, generator)


def _subset(ids: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` of each row's ``ids`` (B, M) drawn uniformly, sorted: (B, n); the row itself, sorted, when n == M."""
    if n < ids.shape[1]:
        pick = torch.rand(ids.shape, generator=generator, device=ids.device).argsort(dim=1)[:, :n]  # (B, n)
        ids = torch.gather(ids, 1, pick)
    return ids.sort(dim=1).values


def _block_scores(
    cfg: MaskConfig, batch: int, grid: tuple[int, int, int], generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Per-token scores that order whole cuboids of block³ tokens: rank of the token's cell + a value in [0, 1).

    Cells tile the grid with a random offset per sample and axis, so cuboid borders are not tied to a fixed lattice
    and border cells are clipped. Masking the lowest n scores hides complete cells and, to hit n exactly, part of one.
    Returns (B, L).
    """
    block = cfg.block
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


def _random_scores(
    cfg: MaskConfig, batch: int, grid: tuple[int, int, int], generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Independent uniform scores: any ``num_masked`` tokens are equally likely to be hidden. Returns (B, L)."""
    return torch.rand(batch, grid[0] * grid[1] * grid[2], generator=generator, device=device)


def _gaussian_noise(images: torch.Tensor, cfg: MaskConfig, generator: torch.Generator) -> torch.Tensor:
    """Every voxel plus gaussian noise of std ``cfg.noise_std`` (scaled 0..1 intensity units)."""
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return images + cfg.noise_std * noise


register(MaskStrategy("block", "hides cuboids of block³ patches", scores=_block_scores, uses_ratio=True))
register(MaskStrategy("random", "hides independent patches", scores=_random_scores, uses_ratio=True))
register(MaskStrategy("none", "hides nothing: a plain autoencoder (identity)"))
register(MaskStrategy("noise", "adds gaussian noise of noise_std to every voxel (denoising)", corrupt=_gaussian_noise))
