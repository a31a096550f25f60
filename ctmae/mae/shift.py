"""Distribution shift: how far a scan's encoder features lie from the training scans', in units of how far the
training scans lie from each other.

What is measured. ``CROPS_PER_SCAN`` crops at fixed seeded positions of the preprocessed scan go through the encoder
with every token visible (no mask, no decoder); the mean m (D,) of their token features is the scan's pooled
embedding over those crops. The checkpoint stores the training scans' token features as a mean μ (D,) and a
precision matrix: the inverse of their covariance Σ shrunk by ``SHRINK`` towards its mean variance (layer-normed
features have a singular Σ). A scan's distance is the squared Mahalanobis distance d = (m − μ)ᵀ Σ⁻¹ (m − μ).

Scale. ``shift_score`` = d / d_ref, where d_ref is the training scans' own figure: each training scan is scored the
same way against the statistics of the other training scans (leave one scan out), and d_ref is the mean of those
distances, i.e. how far a new scan from the training distribution lands. A scan like the training scans scores about
1 or below (a training scan itself scores below 1: it is in the statistics); above ``WARN_SCORE`` = 3 its features lie
more than three times as far from the training scans' as those scans lie from each other, and ``reconstruct`` and
``embed`` warn (3 sits between the demo model's chest scans, all below 1, and its other body regions, 3.7 and
up, measured below). The score is relative to the model's own figures, so a model that learned little (a few steps) does
not warn on everything (it may warn on nothing). With a single training scan, the lower and the upper half of 16
seeded crops of it (by position along Z) stand in for two scans; parts of one patient lie closer together than two
patients, so such a model's scores run high.

Why this figure. Measured on the demo model (two chest CTs) against real CTs of other regions: the masked-
reconstruction error, which the score used to be, measures how hard a scan is rather than how unfamiliar (an
abdomen/pelvis CT scored below the chest scans: soft tissue is easier to fill than lung); the error relative to a
gaussian fill's put the held-out chest slab (0.97) next to the abdomen/pelvis CT (1.00), and per-token distances
(nearest training token, nearest of 64 centroids, the mean per-token Mahalanobis distance) scored the held-out slab
above an upper-abdomen CT. This score gives the training scans 0.13, the held-out slab 0.72, the upper-abdomen CT
4.9, the abdomen/pelvis CT 8.9 and a skull-and-brain phantom 3.7.

Cost. Every checkpoint stores a fresh reference (``training_reference``): ``CROPS_PER_SCAN`` crops of at most
``MAX_REFERENCE_SCANS`` training scans read from the cache and encoded without gradients (no decoder), D×D moments
and one matrix inverse per scan left out. It reads and encodes no more than scoring 16 scans does, so a stop signal
still gives its checkpoint within seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ctmae.io.discovery import VolumeSource
from ctmae.mae.model import MaskedAutoencoder3D
from ctmae.preprocess.cache import VolumeCache
from ctmae.preprocess.config import PreprocessConfig

KIND = "encoder-feature-mean"  # the kind of reference a checkpoint stores; older checkpoints hold another or none
SEED = 20_240_917  # one fixed seed: every scan is scored on crops at the same generator's positions
CROPS_PER_SCAN = 8
MAX_REFERENCE_SCANS = 16  # a seeded choice of the training scans: enough for the statistics, cheap at a stop signal
SHRINK = 0.01  # share of the covariance replaced by its mean variance, so its inverse exists
WARN_SCORE = 3.0
BATCH = 4  # crops per encoder pass


def crop_positions(shape: Sequence[int], crop: int, seed: int = SEED, count: int = CROPS_PER_SCAN) -> list[tuple]:
    """``count`` seeded corners (x, y, z) of crops in a volume of ``shape`` (X, Y, Z); 0 along edges under a crop."""
    rng = np.random.default_rng(seed)
    return [tuple(int(rng.integers(0, max(n - crop, 0) + 1)) for n in shape) for _ in range(count)]


def scan_crops(volume: Any, crop: int, positions: Sequence[tuple] | None = None) -> torch.Tensor:
    """Crops at ``positions`` (default: ``crop_positions``) of a preprocessed volume (X, Y, Z), a tensor or a cached
    volume (anything sliced as ``volume[x0:x1, y0:y1, z0:z1]``): (count, 1, c, c, c). An edge shorter than the crop
    is zero-padded on both sides as preprocessing pads it (``SpatialPadd``), so a volume gives the same crops padded
    or not."""
    shape = tuple(int(n) for n in volume.shape)
    positions = crop_positions(shape, crop) if positions is None else positions
    before = [max(crop - n, 0) // 2 for n in shape]
    crops = torch.zeros(len(positions), 1, crop, crop, crop)
    for out, (x, y, z) in zip(crops, positions):
        box = torch.as_tensor(np.asarray(volume[x : x + crop, y : y + crop, z : z + crop]), dtype=torch.float32)
        (a, b, c), (i, j, k) = before, box.shape
        out[0, a : a + i, b : b + j, c : c + k] = box
    return crops


@torch.no_grad()
def token_features(model: MaskedAutoencoder3D, crops: torch.Tensor) -> torch.Tensor:
    """Encoder features of every token of crops (N, 1, c, c, c), all visible: (N·L, D) float64 on the CPU."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    features = [
        model.encode(crops[i : i + BATCH].to(device)).flatten(0, 1).double().cpu()  # (b, L, D) -> (b·L, D)
        for i in range(0, len(crops), BATCH)
    ]
    model.train(was_training)
    return torch.cat(features)


def reference(model: MaskedAutoencoder3D, volumes: Sequence[Any], crop: int) -> dict[str, Any]:
    """The training scans' feature statistics as a checkpoint stores them (``KIND``).

    Args:
        model: the MAE whose encoder gives the features.
        volumes: preprocessed training volumes (X, Y, Z): tensors or cached volumes, at least one.
        crop: the model's crop edge.
    """
    if len(volumes) == 1:  # no other scan to leave out: the scan's lower and upper crops stand in for two scans
        corners = sorted(crop_positions(volumes[0].shape, crop, count=2 * CROPS_PER_SCAN), key=lambda p: p[2])
        parts = [(volumes[0], corners[:CROPS_PER_SCAN]), (volumes[0], corners[CROPS_PER_SCAN:])]
    else:
        parts = [(v, None) for v in volumes]
    features = [token_features(model, scan_crops(v, crop, corners)) for v, corners in parts]
    moments = [_moments(f) for f in features]
    total = [sum(m[k] for m in moments) for k in range(3)]
    left_out = [_distance(f, *_fit(*(t - m for t, m in zip(total, mom)))) for f, mom in zip(features, moments)]
    mean, precision = _fit(*total)
    return {
        "kind": KIND,
        "mean": mean.float(),  # (D,)
        "precision": precision.float(),  # (D, D)
        "distance": float(np.mean(left_out)),  # d_ref: the mean leave-one-scan-out distance
        "left_out": left_out,
        "scans": len(volumes),
        "crops_per_scan": CROPS_PER_SCAN,
        "seed": SEED,
        "warn_score": WARN_SCORE,
    }


def training_reference(model: MaskedAutoencoder3D, sources: Sequence[VolumeSource], pre: PreprocessConfig) -> dict:
    """``reference`` over a seeded choice of at most ``MAX_REFERENCE_SCANS`` cached training scans."""
    count = min(len(sources), MAX_REFERENCE_SCANS)
    chosen = sorted(np.random.default_rng(SEED).choice(len(sources), count, replace=False).tolist())
    cache = VolumeCache(pre)
    return reference(model, [cache.load(sources[i]) for i in chosen], pre.crop)


def has_reference(ref: dict[str, Any] | None) -> bool:
    """Whether a checkpoint's ``shift_reference`` is of the kind this version scores against."""
    return isinstance(ref, dict) and ref.get("kind") == KIND


def shift_score(model: MaskedAutoencoder3D, volume: Any, ref: dict[str, Any]) -> float:
    """d / d_ref (see the module's docstring) of a preprocessed volume (X, Y, Z) against a stored reference."""
    features = token_features(model, scan_crops(volume, model.cfg.img_size))
    distance = _distance(features, ref["mean"].double(), ref["precision"].double())
    return distance / max(ref["distance"], 1e-12)


def shift_warning(name: str, score: float) -> str | None:
    """One warning line for a scan that lies far from the training scans, or None."""
    if score <= WARN_SCORE:
        return None
    return (
        f"{name}: shift score {score:.1f} (warning above {WARN_SCORE:g}): its encoder features lie {score:.1f} times "
        f"as far from the training scans' as those lie from each other; this scan is unlike the pretraining data, "
        f"trust the model's output on it less"
    )


def no_reference_note(checkpoint: str) -> str:
    """The one line for a checkpoint written before checkpoints stored this kind of reference."""
    return f"{checkpoint} carries no shift reference (written by an older ctmae): no shift score"


def _moments(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token count, sum (D,) and sum of outer products (D, D) of features (N, D)."""
    return torch.tensor(float(len(features)), dtype=torch.float64), features.sum(0), features.T @ features


def _fit(count: torch.Tensor, total: torch.Tensor, outer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and shrunk precision (D, D) from moments."""
    mean = total / count
    cov = outer / count - torch.outer(mean, mean)
    scale = max(float(cov.trace()) / len(mean), 1e-12)
    shrunk = (1 - SHRINK) * cov + SHRINK * scale * torch.eye(len(mean), dtype=cov.dtype)
    return mean, torch.linalg.inv(shrunk)


def _distance(features: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> float:
    """Squared Mahalanobis distance of the mean of features (N, D) from ``mean`` (D,)."""
    m = features.mean(0) - mean
    return float(m @ precision @ m)
