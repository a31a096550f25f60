"""How much context a mask leaves the encoder: over-masking refused or warned about, with the numbers.

MAE fails when it is over-masked: with too few visible tokens per crop there is nothing to infer hidden anatomy from,
and the loss is minimised by predicting an average. ``pretrain`` refuses settings that leave fewer than
``MIN_VISIBLE_TOKENS`` visible tokens per crop and warns when fewer than ``WARN_VISIBLE_TOKENS`` remain, or when one
mask block spans the whole crop along an axis (a block then hides whole slabs, not objects within a scene).
"""

from __future__ import annotations

from ctmae.mae.config import RunConfig
from ctmae.mae.masking import num_masked, strategy

MIN_VISIBLE_TOKENS = 2  # fewer visible tokens per crop than this is refused: one token relates to nothing
WARN_VISIBLE_TOKENS = 16  # fewer than this gets a warning


def visible_tokens(cfg: RunConfig) -> tuple[int, int]:
    """(visible tokens per crop, tokens per crop) under ``cfg``'s mask."""
    total = cfg.model.grid**3
    return total - num_masked(cfg.mask, total), total


def context_problem(cfg: RunConfig) -> str | None:
    """Why ``cfg`` masks so much that pretraining cannot learn from context, or None."""
    visible, total = visible_tokens(cfg)
    if strategy(cfg.mask).hides_tokens and visible < min(MIN_VISIBLE_TOKENS, total - 1):
        return (
            f"mask ratio {cfg.mask.ratio:g} leaves {visible} of {total} tokens visible per {cfg.preprocess.crop}³ crop "
            f"({cfg.model.patch}³ patches); at least {MIN_VISIBLE_TOKENS} are needed: lower --mask-ratio, or use a "
            f"larger --crop or a smaller --patch"
        )
    return None


def context_warnings(cfg: RunConfig) -> list[str]:
    """One line per setting that leaves the encoder little context (empty when the mask is reasonable)."""
    if not strategy(cfg.mask).hides_tokens:
        return []
    lines = []
    visible, total = visible_tokens(cfg)
    if visible < WARN_VISIBLE_TOKENS:
        lines.append(
            f"mask ratio {cfg.mask.ratio:g} leaves {visible} of {total} tokens ({visible / total:.0%}) visible per "
            f"{cfg.preprocess.crop}³ crop of {cfg.model.patch}³ patches: little context to infer hidden anatomy from "
            f"(ctmae study's ratio sweep shows where the downstream metric turns down)"
        )
    if cfg.mask.kind == "block" and cfg.mask.block >= cfg.model.grid:
        lines.append(
            f"mask block of {cfg.mask.block}³ patches spans the whole {cfg.model.grid}-token crop: blocks hide "
            f"whole slabs of the crop; use --block {max(1, cfg.model.grid // 2)} or a larger --crop"
        )
    return lines
