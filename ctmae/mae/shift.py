"""Distribution shift: how unlike the training scans a scan is, measured by the MAE's own masked-reconstruction error.

At the end of pretraining the checkpoint stores the distribution of this error over the training scans (``reference``:
``CROPS_PER_SCAN`` seeded crops per scan, one fixed seeded mask, the loss over every hidden token). ``reconstruct``
and ``embed`` compute the same error for the scan they are given and report ``shift_score``: how many standard
deviations of the training distribution that error lies from its mean. A scan of another body region, another
modality or another reconstruction kernel reconstructs worse than the training scans and scores high; above
``WARN_SCORE`` the commands warn that the model's outputs on it deserve less trust.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from ctmae.mae.config import RunConfig
from ctmae.mae.masking import corrupt, sample_mask
from ctmae.mae.model import MaskedAutoencoder3D

SEED = 20_240_917  # one fixed seed: every scan is scored under the same crops positions' generator and mask
CROPS_PER_SCAN = 4
MAX_REFERENCE_SCANS = 64  # enough for a mean and spread; keeps the end-of-pretraining pass short
WARN_SCORE = 3.0


@torch.no_grad()
def crops_error(model: MaskedAutoencoder3D, crops: torch.Tensor, cfg: RunConfig) -> float:
    """Masked-reconstruction MSE of crops (N, 1, c, c, c) under the fixed mask, every hidden token predicted."""
    device = next(model.parameters()).device
    crops = crops.to(device)
    mask_cfg = dataclasses.replace(cfg.mask, predict_ratio=1.0)
    gen = torch.Generator(device).manual_seed(SEED)
    mask = sample_mask(mask_cfg, crops.shape[0], model.grid(crops), gen, device)
    was_training = model.training
    model.eval()
    loss, _, _ = model(crops, mask, inputs=corrupt(crops, mask_cfg, gen))
    model.train(was_training)
    return float(loss)


def scan_crops(volume: torch.Tensor, crop: int, count: int = CROPS_PER_SCAN) -> torch.Tensor:
    """``count`` crops at fixed seeded positions of a preprocessed volume (X, Y, Z), zero-padded to the crop size:
    (count, 1, c, c, c)."""
    pads = [p for n in reversed(volume.shape) for p in (0, max(0, crop - n))]
    volume = torch.nn.functional.pad(volume, pads)  # every edge >= crop
    rng = np.random.default_rng(SEED)
    crops = []
    for _ in range(count):
        x, y, z = (int(rng.integers(0, n - crop + 1)) for n in volume.shape)
        crops.append(volume[x : x + crop, y : y + crop, z : z + crop])
    return torch.stack(crops)[:, None]


def reference(errors: list[float]) -> dict[str, Any]:
    """The training scans' error distribution as a checkpoint stores it."""
    values = np.asarray(errors, dtype=np.float64)
    return {
        "errors": sorted(float(e) for e in values),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "seed": SEED,
        "crops_per_scan": CROPS_PER_SCAN,
    }


def shift_score(error: float, ref: dict[str, Any]) -> float:
    """How many standard deviations ``error`` lies above the training scans' mean (the spread is floored at 5% of
    the mean, so a handful of near-identical training scans does not make every new scan look shifted)."""
    spread = max(ref["std"], 0.05 * ref["mean"], 1e-8)
    return (error - ref["mean"]) / spread


def shift_warning(name: str, score: float) -> str | None:
    """One warning line for a scan that lies far from the training scans, or None."""
    if score <= WARN_SCORE:
        return None
    return (
        f"{name}: shift score {score:.1f} (its masked-reconstruction error lies {score:.1f} standard deviations "
        f"above the training scans'): this scan is unlike the pretraining data; trust the model's output on it less"
    )
