"""Run configuration: data, model, masking and optimisation settings, stored in every checkpoint.

Each section is a frozen dataclass; ``RunConfig.to_dict`` / ``RunConfig.from_dict`` give the plain-dict form that
``config.yaml`` and checkpoints hold. ``from_dict`` names the offending key on an unknown key or a wrong type.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctmae.mae.masking import MaskConfig, strategy  # the mask section lives with the registry it names
from ctmae.runtime.config import Sections, check_common

# Encoder/decoder sizes, one entry per preset; head_dim = dim / heads. tiny, small and base keep 12 encoder blocks
# because MONAI's UNETR (finetune-seg) reads blocks 3, 6, 9 and 12 of a 12-block ViT with 16³ patches.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(dim=96, depth=12, heads=4, dec_dim=64, dec_depth=1, dec_heads=4),  # CPU tests and demos
    "small": dict(dim=384, depth=12, heads=6, dec_dim=256, dec_depth=2, dec_heads=8),
    "base": dict(dim=768, depth=12, heads=12, dec_dim=384, dec_depth=4, dec_heads=12),  # ViT-B; MONAI MAE's decoder
    "large": dict(dim=1024, depth=24, heads=16, dec_dim=512, dec_depth=4, dec_heads=16),
}


def default_cache_dir() -> str:
    """The preprocessing cache shared by all runs of this user: ``$XDG_CACHE_HOME/ctmae`` or ``~/.cache/ctmae``."""
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ctmae")


@dataclass(frozen=True)
class DataConfig:
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)  # target voxel size in mm along RAS x, y, z
    hu_window: tuple[float, float] = (-1000.0, 1000.0)  # HU clipped to this range, then scaled to 0..1
    crop: int = 96  # edge of the cubic training crop in voxels; a multiple of the patch size
    crops_per_volume: int = 4  # random crops drawn each time a cached volume is read
    flip: bool = False  # pretraining mirrors each crop left-right (RAS x) with probability 1/2
    zoom: float = 0.0  # > 0: each pretraining crop is scaled by s, log-uniform in [1/(1+zoom), 1+zoom] (anatomy of
    # other sizes: patients differ; a cube of crop·s voxels is read and resampled trilinearly to the crop)
    contrast: float = 0.0  # > 0: each pretraining crop's 0..1 intensities x become x^g, g log-uniform in
    # [1/(1+contrast), 1+contrast] (scanners, doses and contrast agent shift soft tissue; air and the top stay put)
    cache_dir: str = field(default_factory=default_cache_dir)  # preprocessed volumes, keyed by file and settings
    workers: int | None = None  # DataLoader worker processes (0: load in the training process; None: planned from
    # the CPU budget and /dev/shm by the command, ctmae.runtime.resources; in-process where nothing planned it)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "mae3d"  # architecture in ctmae.mae.model.ARCHITECTURES that this config builds
    size: str = "base"  # preset name the widths below came from (informative)
    img_size: int = 96  # crop edge the position embeddings are built for
    patch: int = 16  # edge of the cubic, non-overlapping patches
    in_chans: int = 1  # CT has one channel
    dim: int = 768  # encoder width
    depth: int = 12  # encoder blocks
    heads: int = 12  # encoder attention heads
    dec_dim: int = 384  # decoder width
    dec_depth: int = 4  # decoder blocks
    dec_heads: int = 12  # decoder attention heads
    mlp_ratio: float = 4.0  # MLP hidden width / model width
    qkv_bias: bool = True  # bias on the fused q/k/v projection (MONAI's ViT must be built with the same value)
    norm_pix_loss: bool = False  # normalise each target patch to zero mean, unit variance (MAE's option)
    head: str = "linear"  # decoder's voxel head: linear (MAE's) | upsample (two transposed convolutions per patch) |
    # smooth (with fill_sigma: a residual on the fill's 4x coarser grid, interpolated across patch borders)
    fill_sigma: float = 0.0  # > 0: the decoder predicts the residual over a gaussian fill (sigma in voxels) of the
    # visible voxels; 0: the voxels themselves (MAE's)
    fill_queries: bool = False  # with fill_sigma: each decoder query reads its patch's fills at several widths

    @property
    def grid(self) -> int:
        """Patches along each axis of a crop."""
        return self.img_size // self.patch


@dataclass(frozen=True)
class TrainConfig:
    steps: int | None = None  # optimiser steps; None: from epochs, or 1000 when neither is given
    epochs: float | None = None  # passes over all crops (volumes x crops_per_volume); used when steps is None
    batch_size: int = 2  # crops per optimiser step (per process)
    lr: float = 1.5e-4  # peak learning rate, AdamW
    min_lr: float = 0.0  # learning rate at the end of the cosine decay
    warmup: float = 0.05  # share of steps with linear warm-up
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    # max global gradient norm; 0 (MAE's recipe) disables clipping and lets each weight step inside backward, which
    # never holds all gradients at once (ctmae.runtime.optim)
    grad_clip: float = 0.0
    seed: int = 0  # seeds weights, data order, crops and masks
    device: str = "auto"  # auto picks CUDA when present
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    log_every: int = 10  # steps between metrics.jsonl lines
    ckpt_every: int = 500  # steps between periodic checkpoints (last.pt is refreshed at each)


@dataclass(frozen=True)
class RunConfig(Sections):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        check(self)

    @classmethod
    def expand(cls, d: dict[str, Any], base: RunConfig) -> tuple[dict[str, Any], RunConfig]:
        """A ``model.size`` preset brings its widths (other model keys refine it); ``data.crop`` sets the model's
        ``img_size`` too (one crop size for both)."""
        model = d.get("model") or {}
        if isinstance(model, dict) and "size" in model:
            if model["size"] not in MODEL_PRESETS:
                raise ValueError(f"unknown model size {model['size']!r}; choose one of {', '.join(MODEL_PRESETS)}")
            base = dataclasses.replace(base, model=dataclasses.replace(base.model, **MODEL_PRESETS[model["size"]]))
        data = d.get("data") or {}
        if isinstance(data, dict) and "crop" in data and isinstance(model, dict):
            d["model"] = {"img_size": data["crop"], **model}
        return d, base


def check(cfg: RunConfig) -> None:
    """Cross-field checks; ValueError with what was given."""
    m, d, k, t = cfg.model, cfg.data, cfg.mask, cfg.train
    if m.patch < 1 or m.img_size % m.patch:
        raise ValueError(f"crop {m.img_size} must be a positive multiple of the patch size {m.patch}")
    if d.crop != m.img_size:
        raise ValueError(f"data.crop ({d.crop}) and model.img_size ({m.img_size}) must be equal")
    if m.head not in ("linear", "upsample", "smooth") or (m.head == "upsample" and m.patch % 4):
        raise ValueError(f"model.head must be linear, upsample (patch divisible by 4) or smooth, got {m.head!r}")
    if m.head == "smooth" and not m.fill_sigma:
        raise ValueError("model.head smooth predicts a residual over a fill: it needs model.fill_sigma > 0")
    if m.fill_queries and not m.fill_sigma:
        raise ValueError("model.fill_queries needs model.fill_sigma > 0 (the fill the decoder corrects)")
    if m.dim % m.heads or m.dec_dim % m.dec_heads:
        raise ValueError(f"widths must divide by heads: dim {m.dim}/{m.heads}, dec_dim {m.dec_dim}/{m.dec_heads}")
    if strategy(k).uses_ratio and not 0.0 < k.ratio < 1.0:  # ValueError naming the known kinds for an unknown one
        raise ValueError(f"mask ratio must be between 0 and 1 (exclusive), got {k.ratio}")
    if not 0.0 < k.predict_ratio <= 1.0:
        raise ValueError(f"predict_ratio must be in (0, 1], got {k.predict_ratio}")
    if k.block < 1 or k.noise_std < 0:
        raise ValueError(f"block must be >= 1 and noise_std >= 0, got {k.block} and {k.noise_std}")
    if t.batch_size < 1 or d.crops_per_volume < 1 or (d.workers or 0) < 0:
        raise ValueError("batch_size and crops_per_volume must be >= 1, workers >= 0")
    if not 0.0 <= d.zoom <= 1.0:
        raise ValueError(f"data.zoom must be in [0, 1] (crops scaled by up to 1 + zoom), got {d.zoom}")
    if not 0.0 <= d.contrast <= 1.0:
        raise ValueError(f"data.contrast must be in [0, 1] (gamma up to 1 + contrast), got {d.contrast}")
    check_common(d, t)
