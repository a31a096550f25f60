"""The frozen probe: a linear classifier per token on frozen features, scored by per-class Dice on voxels.

Each scan is covered by patch-aligned windows and turned into a token feature map (D, gx, gy, gz), token (a, b, c)
holding voxels [a·p, (a+1)·p) etc. of the preprocessed volume. A token's target is the share of each class among its
voxels (the label went through the same preprocessing as the image). A multinomial logistic regression (standardised
features, class-balanced soft cross-entropy, full-batch Adam, on the CPU) is fitted on the training cases' tokens;
on a test case its token class probabilities are upsampled to voxels (trilinear, token centres at patch centres)
and the argmax is scored against the label with Dice per foreground class.

Three kinds of features share this machinery: a pretrained encoder's, a randomly initialised encoder's of the same
size (the from-scratch baseline) and the raw intensity statistics of each patch (no encoder: the floor an encoder
must beat to have learned anything beyond the intensity of a patch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from statistics import fmean

import torch
import torch.nn.functional as F
from monai.metrics import compute_dice

from ctmae.experiments.evaluate.cases import Prepared
from ctmae.infer.embed import token_features
from ctmae.infer.sliding import LoadedModel, pad_to_patches

Featurizer = Callable[[torch.Tensor], torch.Tensor]  # preprocessed (1, X, Y, Z) -> token features (D, gx, gy, gz)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)  # of each patch's voxels, for the intensity floor
# Below this many feature values a fit runs on one thread: thread wake-ups would cost more than the arithmetic
# (10x slower on a busy 2-core machine).
SMALL_FIT = 4_000_000


def encoder_featurizer(loaded: LoadedModel, batch_size: int) -> Featurizer:
    """The encoder's token features over a whole scan (``ctmae.infer.embed.token_features``), no masking."""
    return lambda volume: token_features(loaded, volume, batch_size)


def intensity_featurizer(patch: int) -> Featurizer:
    """Per patch: mean, standard deviation and the ``QUANTILES`` of its voxels: (7, gx, gy, gz), no encoder."""

    def featurize(volume: torch.Tensor) -> torch.Tensor:
        padded = pad_to_patches(volume.float(), patch)[0]  # (Xp, Yp, Zp)
        g = [n // patch for n in padded.shape]
        voxels = padded.reshape(g[0], patch, g[1], patch, g[2], patch).permute(0, 2, 4, 1, 3, 5)
        voxels = voxels.reshape(*g, patch**3).sort(-1).values  # (gx, gy, gz, p³), sorted per patch
        picks = [voxels[..., round(q * (patch**3 - 1))] for q in QUANTILES]
        return torch.stack([voxels.mean(-1), voxels.std(-1), *picks])  # (7, gx, gy, gz)

    return featurize


def token_targets(label: torch.Tensor, patch: int, classes: int) -> torch.Tensor:
    """Share of each class among each patch's voxels: label (1, X, Y, Z) -> (C, gx, gy, gz), summing to 1.

    Voxels of the padding to whole patches count as background, as the padding is air.
    """
    padded = pad_to_patches(label, patch)  # (1, Xp, Yp, Zp)
    shares = [F.avg_pool3d((padded == c).float()[None], patch)[0, 0] for c in range(classes)]
    return torch.stack(shares)  # (C, gx, gy, gz)


@dataclass
class LinearProbe:
    """A fitted multinomial logistic regression over standardised features."""

    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Token features (D, gx, gy, gz) -> class logits (C, gx, gy, gz)."""
        d, *grid = features.shape
        z = (features.reshape(d, -1).T.float() - self.mean) / self.std  # (L, D)
        return (z @ self.weight.T + self.bias).T.reshape(-1, *grid)


def fit_probe(x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, seed: int, max_tokens: int) -> LinearProbe:
    """Fit the probe on tokens ``x`` (N, D) with class shares ``y`` (N, C) on the CPU.

    Classes are weighted by the inverse of their share of the training voxels (so a small structure is not
    drowned by background); weights start at zero, so the fit is deterministic given the tokens, and ``seed`` only
    picks the subsample when there are more than ``max_tokens`` tokens.
    """
    if x.shape[0] > max_tokens:
        keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_tokens]
        x, y = x[keep], y[keep]
    x, y = x.float().cpu(), y.float().cpu()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std  # (N, D)
    share = y.mean(0).clamp_min(1e-8)  # (C,)
    class_weight = torch.where(y.sum(0) > 0, 1.0 / share, torch.zeros_like(share))
    class_weight = class_weight / (class_weight * share).sum()  # the weighted shares sum to 1
    weight = torch.zeros(y.shape[1], x.shape[1], requires_grad=True)
    bias = torch.zeros(y.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    with torch.enable_grad(), _threads(1 if z.numel() < SMALL_FIT else torch.get_num_threads()):
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            # soft-target cross-entropy, written out: F.cross_entropy's soft-target path is ~10x slower on a CPU
            log_p = (z @ weight.T + bias).log_softmax(1)  # (N, C)
            loss = -(log_p * y * class_weight).sum(1).mean() + 1e-4 * weight.pow(2).sum()
            loss.backward()
            optimizer.step()
    return LinearProbe(mean, std, weight.detach(), bias.detach())


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def voxel_labels(logits: torch.Tensor, patch: int, shape: Sequence[int]) -> torch.Tensor:
    """Token logits (C, gx, gy, gz) -> voxel class map (X, Y, Z): class probabilities upsampled by ``patch``
    (trilinear), then argmax.

    With ``align_corners=False`` a token's value lands on its patch's centre and voxels between centres blend.
    Probabilities, not logits, are blended: they saturate, so a confident background token next to a less
    confident structure token does not push the boundary deep into the structure (on a phantom of one-token-thick
    rods, blending logits lost a fifth of the Dice that blending probabilities kept).
    """
    probs = logits.float().softmax(0)[None]  # (1, C, gx, gy, gz)
    up = F.interpolate(probs, scale_factor=patch, mode="trilinear", align_corners=False)[0]
    return up[:, : shape[0], : shape[1], : shape[2]].argmax(0)  # (X, Y, Z)


def case_dice(pred: torch.Tensor, label: torch.Tensor, classes: int) -> list[float]:
    """Dice per foreground class of one case, pred (X, Y, Z) vs label (1, X, Y, Z); a class absent from both
    counts 1 (as ``ctmae.seg.train.evaluate``)."""
    one_hot = [F.one_hot(t.long().reshape(1, *pred.shape), classes).permute(0, 4, 1, 2, 3) for t in (pred, label)]
    dice = compute_dice(one_hot[0], one_hot[1], include_background=False, ignore_empty=False)  # (1, C-1)
    return [float(d) for d in dice[0]]


@dataclass
class ProbeResult:
    dice: float  # mean over foreground classes of the per-class mean over test cases
    dice_per_class: list[float]
    per_case: dict[str, list[float]]  # test case id -> Dice per foreground class
    tokens: int  # training tokens the probe was fitted on
    features: int  # feature width D
    draws: list[float] = field(default_factory=list)  # each random encoder's mean Dice, when this is their mean

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def run_probe(
    featurize: Featurizer,
    train: Sequence[Prepared],
    test: Sequence[Prepared],
    classes: int,
    patch: int,
    steps: int = 300,
    lr: float = 0.05,
    seed: int = 0,
    max_tokens: int = 200_000,
    on_case: Callable[[], None] | None = None,
) -> ProbeResult:
    """Fit the probe on ``train``'s tokens and score it on ``test``: the whole probe protocol for one featurizer.

    ``on_case`` is called after each case is featurized (train and test); it may raise to abandon the probe.
    """
    xs, ys = [], []
    for case in train:
        feats = featurize(case.image.as_tensor())  # (D, gx, gy, gz)
        xs.append(feats.flatten(1).T)  # (L, D)
        ys.append(token_targets(case.label, patch, classes).flatten(1).T)  # (L, C)
        if on_case:
            on_case()
    probe = fit_probe(torch.cat(xs), torch.cat(ys), steps, lr, seed, max_tokens)
    per_case = {}
    for case in test:
        logits = probe.logits(featurize(case.image.as_tensor()))
        per_case[case.id] = case_dice(voxel_labels(logits, patch, case.label.shape[1:]), case.label, classes)
        if on_case:
            on_case()
    per_class = [sum(d[c] for d in per_case.values()) / len(per_case) for c in range(classes - 1)]
    return ProbeResult(sum(per_class) / len(per_class), per_class, per_case, sum(len(x) for x in xs), xs[0].shape[1])


def mean_of_draws(results: Sequence[ProbeResult]) -> ProbeResult:
    """Several probes of the same cases (one per randomly initialised encoder) as one: every Dice the mean over
    them, and ``draws`` each one's mean Dice; a single result is returned as it is."""
    if len(results) == 1:
        return results[0]
    per_class = [fmean(c) for c in zip(*(r.dice_per_class for r in results))]
    per_case = {case: [fmean(c) for c in zip(*(r.per_case[case] for r in results))] for case in results[0].per_case}
    first = results[0]
    return ProbeResult(fmean(per_class), per_class, per_case, first.tokens, first.features, [r.dice for r in results])
