"""Masked-voxel PSNR of the MAE next to trivial fills of the visible voxels under the very same masks.

Crops of the checkpoint's size are taken at seeded places in each test scan and masked with the checkpoint's ratio
(and block edge), once with block masks and once with random ones. For each masked crop three things fill the hidden
voxels: the MAE (its decoder predicts every hidden token), a normalised gaussian convolution of the visible voxels
(``G*(x·m) / G*m`` for a few sigmas, the best one reported: an optimistic floor, chosen on the test scans
themselves) and the mean of the visible voxels. PSNR is over hidden voxels in 0..1 window units (peak 1), pooled over
all crops of all test scans, as ``ctmae reconstruct`` reports it.

A model pretrained with fill context (``model.fill_context``) learned to correct fills that read the scan around its
crops, and ``ctmae reconstruct`` fills from the whole scan: here each of its crops comes with that many voxels of the
scan around it, hidden in blocks like the crop (a mask of its own, drawn after the crop's, so the crop's hidden voxels
are the same as for any other checkpoint of its crop size), and both its fills and the gaussian fills read the visible
voxels there; the scores stay on the crop's hidden voxels.

Random masking hides isolated patches whose neighbours are visible, so smooth interpolation fills them well; block
masking hides cuboids of several patches, whose centres are far from any visible voxel. A model that beats the
gaussian fill under block masks has learned something interpolation cannot give.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ctmae.experiments.evaluate.cases import Prepared
from ctmae.mae.config import MaskConfig
from ctmae.mae.fill_context import cells_to_voxels, pool_factor
from ctmae.mae.fills import SIGMAS, gaussian_fill
from ctmae.mae.masking import sample_mask
from ctmae.mae.model import MaskedAutoencoder3D

KINDS = ("block", "random")


@dataclass
class Tally:
    """Sums of squared errors over hidden voxels, per fill method, and the number of hidden voxels."""

    sse: dict[str, float] = field(default_factory=dict)
    voxels: int = 0

    def add(self, other: Tally) -> None:
        for k, v in other.sse.items():
            self.sse[k] = self.sse.get(k, 0.0) + v
        self.voxels += other.voxels

    def psnr(self, method: str) -> float | None:
        if method not in self.sse or not self.voxels:
            return None
        mse = self.sse[method] / self.voxels
        return 10.0 * math.log10(1.0 / mse) if mse > 0 else None


def mask_settings(mask: MaskConfig, kind: str) -> MaskConfig:
    """The checkpoint's ratio and block edge with mask ``kind``; 0.75 when it trained without hiding tokens."""
    ratio = mask.ratio if mask.kind in KINDS else 0.75
    return MaskConfig(kind=kind, ratio=ratio, block=mask.block)


def window_corners(shape: Sequence[int], crop: int, count: int, gen: torch.Generator) -> list[tuple[int, int, int]]:
    """``count`` seeded crop corners inside a (X, Y, Z) volume that is at least ``crop`` along every axis."""
    return [tuple(int(torch.randint(0, n - crop + 1, (1,), generator=gen)) for n in shape) for _ in range(count)]


@torch.inference_mode()
def masked_errors(
    window: torch.Tensor,
    mask: MaskConfig,
    seed: int,
    patch: int,
    model: MaskedAutoencoder3D | None = None,
    around: torch.Tensor | None = None,
) -> Tally:
    """Squared errors on the hidden voxels of one crop (1, 1, c, c, c) under one seeded token mask, per method:
    ``mae`` (only when ``model`` is given), ``mean`` and ``gaussian_<sigma>`` for each of ``SIGMAS``. With
    ``around`` (1, 1, e, e, e), the crop with (e - c) / 2 voxels of the scan around it (NaN beyond the scan), the
    fills read its visible voxels too: the ring is hidden by a mask of its own, drawn after the crop's."""
    device, c = window.device, window.shape[-1]
    grid = (c // patch,) * 3
    gen = torch.Generator(device).manual_seed(seed)
    token_mask = sample_mask(mask, 1, grid, gen, device)
    visible = cells_to_voxels((~token_mask.mask).float().view(1, 1, *grid), patch)  # (1, 1, c, c, c), 1 where seen
    gone = 1.0 - visible
    values, seen, centre = window, visible, (slice(None),) * 5
    if around is not None:
        m, big = (around.shape[-1] - c) // 2, (around.shape[-1] // patch,) * 3
        centre = (slice(None), slice(None), *[slice(m, m + c)] * 3)
        ring = sample_mask(mask, 1, big, gen, device).mask.float().view(1, 1, *big)
        seen = cells_to_voxels(1.0 - ring, patch)  # (1, 1, e, e, e)
        seen[centre] = visible
        seen, values = seen * torch.isfinite(around), torch.nan_to_num(around)  # nothing beyond the scan is seen
    tally = Tally(voxels=int(gone.sum()))
    if model is not None:
        ids_pred = token_mask.mask[0].nonzero()[:, 0][None]  # (1, Lm): every hidden token, sorted
        maps = None
        if around is not None:
            f = pool_factor(patch)
            maps = model.fill_context_maps(values, seen)[(slice(None), slice(None), *[slice(m // f, (m + c) // f)] * 3)]
        pred = (
            model.reconstruct(window, token_mask.ids_keep, ids_pred, maps=maps).float().clamp(0, 1)
        )  # (1, 1, c, c, c)
        tally.sse["mae"] = float((((pred - window) * gone) ** 2).sum())
    mean = (values * seen).sum() / seen.sum()
    tally.sse["mean"] = float((((window - mean) * gone) ** 2).sum())
    for sigma in SIGMAS:
        fill = gaussian_fill(values, seen, sigma)[centre]  # (1, 1, c, c, c)
        tally.sse[f"gaussian_{sigma:g}"] = float((((window - fill) * gone) ** 2).sum())
    return tally


def run_recon(
    model: MaskedAutoencoder3D,
    mask: MaskConfig,
    test: Sequence[Prepared],
    windows: int,
    seed: int,
    device: torch.device,
    use_model: bool = True,
    on_case: Callable[[], None] | None = None,
) -> dict:
    """The recon protocol for one checkpoint: PSNR per mask kind and fill method, pooled and per test case.

    Crop places and masks depend on ``seed``, the case's position in ``test``, the crop size and the mask
    settings only, so checkpoints of one size are scored on identical masked crops. ``use_model`` False (a
    ``norm_pix_loss`` checkpoint, whose predictions carry no intensity scale) scores the fills alone.
    """
    crop, context = model.cfg.img_size, model.cfg.fill_context if use_model else 0
    e = crop + 2 * context  # the edge of a crop with the scan around it
    pooled = {kind: Tally() for kind in KINDS}
    per_case: dict[str, dict[str, Tally]] = {}
    for i, case in enumerate(test):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        volume = case.image.as_tensor()  # (1, X, Y, Z), at least crop along each axis (padded)
        # with fill context, the scan around each crop: NaN beyond the scan, (1, X + 2·context, ...)
        beyond = F.pad(volume.float(), (context,) * 6, value=math.nan) if context else None
        per_case[case.id] = {kind: Tally() for kind in KINDS}
        for w, (x, y, z) in enumerate(window_corners(volume.shape[1:], crop, windows, gen)):
            window = volume[None, :, x : x + crop, y : y + crop, z : z + crop].float().to(device)  # (1, 1, c, c, c)
            around = None if beyond is None else beyond[None, :, x : x + e, y : y + e, z : z + e].to(device)
            for k, kind in enumerate(KINDS):
                mask_seed = (seed * 1_000_003 + i) * 1_009 + w * 2 + k
                settings = mask_settings(mask, kind)
                scored = model if use_model else None
                tally = masked_errors(window, settings, mask_seed, model.cfg.patch, scored, around)
                per_case[case.id][kind].add(tally)
                pooled[kind].add(tally)
        if on_case:
            on_case()
    result = {"crop": crop, "windows_per_case": windows, "ratio": mask_settings(mask, "block").ratio}
    result["block_edge"] = mask.block
    for kind, tally in pooled.items():
        best = max(SIGMAS, key=lambda s: tally.psnr(f"gaussian_{s:g}") or -math.inf)
        result[kind] = {
            "voxels": tally.voxels,
            "mae": tally.psnr("mae"),
            "gaussian": tally.psnr(f"gaussian_{best:g}"),
            "gaussian_sigma": best,
            "mean": tally.psnr("mean"),
            "gaussian_by_sigma": {f"{s:g}": tally.psnr(f"gaussian_{s:g}") for s in SIGMAS},
        }
        for case_id, tallies in per_case.items():
            t = tallies[kind]
            result.setdefault("per_case", {}).setdefault(case_id, {})[kind] = {
                "mae": t.psnr("mae"),
                "gaussian": t.psnr(f"gaussian_{best:g}"),
                "mean": t.psnr("mean"),
            }
    return result
