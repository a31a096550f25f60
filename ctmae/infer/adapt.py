"""Test-time training: before a scan is reconstructed, the model learns for a few steps on that scan's own visible
voxels, as MAE test-time training does (Gandelsman et al., 2022): a patient, scanner or body region the
pretraining never saw shifts what a hidden block most likely holds, and the visible part of the scan says how.

Each step takes one crop of the scan on the token grid and hides a training mask in it; the loss covers the hidden
tokens that the scan's own mask left visible. Tokens the scan's mask hides are never a target and never an input,
and fills read only the voxels left visible, so nothing of the voxels being scored enters the adaptation. The
adapted model is a copy: the checkpoint's model stays as it was for the next scan.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch

from ctmae.infer.sliding import LoadedModel
from ctmae.mae.fill_context import cells_to_voxels, coarse_sums, fill_reach, pool_factor
from ctmae.mae.masking import TokenMask, sample_mask
from ctmae.mae.model import MaskedAutoencoder3D
from ctmae.runtime.lr_schedule import lr_factor
from ctmae.runtime.optim import build_optimizer
from ctmae.runtime.signals import check_stop

LR_SHARE = 0.1  # of the pretraining's peak learning rate: a nudge of a trained model, not a new run
CROPS_PER_STEP = 4  # crops whose gradients make one step (each has its own count of visible tokens)


def adapt(
    loaded: LoadedModel,
    volume: torch.Tensor,
    known: torch.Tensor,
    hidden: torch.Tensor,
    steps: int,
    seed: int,
    on_step: Callable[[int, int], None] | None = None,
) -> MaskedAutoencoder3D:
    """A copy of the model trained for ``steps`` steps on the visible tokens of one scan.

    Args:
        volume: (1, X, Y, Z) the preprocessed scan, padded to whole patches and at least a crop.
        known: (1, X, Y, Z) 0/1, the scan's voxels (0 on the padding).
        hidden: (X/p, Y/p, Z/p) bool, the tokens the scan's mask hides: never read, never a target.
        steps: optimiser steps, one crop each.
        seed: seeds the crops and the training masks.
        on_step: called after each step with (steps done, steps).

    Returns:
        The adapted copy, in eval mode.

    Raises:
        Stopped: a stop signal came (checked between steps).
    """
    cfg, p, c = loaded.cfg, loaded.cfg.model.patch, loaded.cfg.model.img_size
    with torch.inference_mode(False), torch.enable_grad():
        model = copy.deepcopy(loaded.model).train()
        volume, known, hidden = volume.clone(), known.clone(), hidden.clone()  # out of reconstruct's inference mode
        optimizer = build_optimizer(model, dataclasses.replace(cfg.train, lr=cfg.train.lr * LR_SHARE))
        gen = torch.Generator(volume.device).manual_seed(seed)
        grid = (c // p,) * 3
        visible = (cells_to_voxels((~hidden).float(), p) * known)[None]  # (1, 1, X, Y, Z)
        scan_sums = coarse_sums(volume[None], visible, p)
        peak = optimizer.param_groups[0]["lr"]
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = peak * lr_factor(step, steps, 0.0, 0.0)  # cosine to 0: the last steps settle
            optimizer.zero_grad(set_to_none=True)
            for _ in range(CROPS_PER_STEP):
                at = [
                    int(torch.randint(0, (n - c) // p + 1, (1,), generator=gen, device=gen.device)) * p
                    for n in volume.shape[1:]
                ]
                box = tuple(slice(a, a + c) for a in at)
                drawn = sample_mask(cfg.mask, 1, grid, gen, volume.device).mask[0]  # (L,) the training mask
                scanned = hidden[tuple(slice(a // p, (a + c) // p) for a in at)].flatten()  # (L,) hidden for good
                keep, targets = ~drawn & ~scanned, drawn & ~scanned
                if not keep.any() or not targets.any():
                    continue
                mask = TokenMask(keep.nonzero().T, targets.nonzero().T, ~keep[None])
                maps = None
                if cfg.model.fill_context:  # the fills read the scan around the crop, as in pretraining
                    maps = _scan_fills(model, volume, visible, scan_sums, at, drawn)
                loss, _, _ = model(volume[(slice(None), *box)][None], mask, maps=maps)
                (loss / CROPS_PER_STEP).backward()
            optimizer.step()
            check_stop()
            if on_step is not None:
                on_step(step + 1, steps)
    return model.eval()


def _scan_fills(
    model: MaskedAutoencoder3D,
    volume: torch.Tensor,
    visible: torch.Tensor,
    scan_sums: tuple[torch.Tensor, torch.Tensor],
    at: list[int],
    drawn: torch.Tensor,
) -> torch.Tensor:
    """The fills of the whole scan at the crop whose corner is ``at`` (voxels, on the patch grid), with the tokens
    ``drawn`` (L,) of the crop hidden as well: (1, 2S, c/f, c/f, c/f).

    Computed over the crop and ``fill_reach`` around it only, with the scan's sums for the fallback fill, which
    gives the whole scan's maps there at a fraction of the cost on a clinical scan (320³ voxels, the demo's model,
    2 cores: 0.36 s a step, where the whole scan's maps take 0.78).
    """
    c, p, f = model.cfg.img_size, model.cfg.patch, pool_factor(model.cfg.patch)
    reach = fill_reach(model.fill_sigmas, p)
    lo = [max(0, a - reach) for a in at]
    hi = [min(n, a + c + reach) for a, n in zip(at, volume.shape[1:])]
    region = (slice(None), slice(None), *(slice(a, b) for a, b in zip(lo, hi)))  # crop and reach, within the scan
    inner = (slice(None), slice(None), *(slice(a - b, a - b + c) for a, b in zip(at, lo)))  # the crop in the region
    seen, crop = visible[region].clone(), volume[None][region][inner]  # (1, 1, x, y, z), (1, 1, c, c, c)
    before = coarse_sums(crop, seen[inner], p)
    seen[inner] *= cells_to_voxels((~drawn).float().view((c // p,) * 3), p)  # (c, c, c)
    after = coarse_sums(crop, seen[inner], p)
    sums = tuple(whole - old + new for whole, old, new in zip(scan_sums, before, after))
    maps = model.fill_context_maps(volume[None][region], seen, sums)  # (1, 2S, x/f, y/f, z/f)
    return maps[(slice(None), slice(None), *(slice(s.start // f, s.stop // f) for s in inner[2:]))]
