"""Run configuration: preprocessing, data, model, masking and optimisation settings, stored in every checkpoint.

Each section is a frozen dataclass; ``RunConfig.to_dict`` / ``RunConfig.from_dict`` give the plain-dict form that
``config.yaml`` and checkpoints hold. ``from_dict`` names the offending key on an unknown key or a wrong type.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ctmae.mae.masking import MaskConfig, strategy  # the mask section lives with the registry it names
from ctmae.preprocess.config import PreprocessConfig, lift_flat_layout
from ctmae.runtime.config import Sections, check_common

# Encoder/decoder sizes, one entry per preset; head_dim = dim / heads. tiny, small and base keep 12 encoder blocks
# because MONAI's UNETR (finetune-seg) reads blocks 3, 6, 9 and 12 of a 12-block ViT with 16³ patches.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(dim=96, depth=12, heads=4, dec_dim=64, dec_depth=1, dec_heads=4),  # CPU tests and demos
    "small": dict(dim=384, depth=12, heads=6, dec_dim=256, dec_depth=2, dec_heads=8),
    "base": dict(dim=768, depth=12, heads=12, dec_dim=384, dec_depth=4, dec_heads=12),  # ViT-B; MONAI MAE's decoder
    "large": dict(dim=1024, depth=24, heads=16, dec_dim=512, dec_depth=4, dec_heads=16),
}
# nnU-Net's Primus (``--arch primus``): s/b/m/l are exactly the widths, depths and heads of nnU-Net's
# nnUNet_Primus_{S,B,M,L}_Trainer, with its 8³ patches and EVA's SwiGLU MLP ratio (8/3); the decoder is ctmae's.
PRIMUS_PRESETS: dict[str, dict[str, float]] = {
    "tiny": dict(dim=96, depth=4, heads=2, dec_dim=64, dec_depth=1, dec_heads=4),  # CPU tests and demos
    "s": dict(dim=396, depth=12, heads=6, dec_dim=256, dec_depth=2, dec_heads=8),
    "b": dict(dim=792, depth=12, heads=12, dec_dim=384, dec_depth=4, dec_heads=12),
    "m": dict(dim=864, depth=16, heads=12, dec_dim=384, dec_depth=4, dec_heads=12),
    "l": dict(dim=1056, depth=24, heads=16, dec_dim=512, dec_depth=4, dec_heads=16),
}
for _preset in PRIMUS_PRESETS.values():
    _preset.update(patch=8, mlp_ratio=4 * 2 / 3)
# The presets of each architecture (``ModelConfig.arch``) and the one a run gets when it names none.
PRESETS: dict[str, dict[str, dict[str, float]]] = {"mae3d": MODEL_PRESETS, "primus": PRIMUS_PRESETS}
DEFAULT_SIZE = {"mae3d": "base", "primus": "b"}
PRIMUS_PATCH = 8  # nnU-Net's Primus trainers embed 8³ patches


RECIPES = ("demo", "gpu")  # YAML files in ctmae/recipes/: the CPU demo, a base recipe for GPUs


def recipe_path(name: str | os.PathLike) -> Path:
    """The file ``--config`` names: an existing YAML file, or a recipe shipped in ctmae/recipes/ by name.

    Raises:
        ValueError: neither a file nor a recipe, naming both.
    """
    if Path(name).is_file():
        return Path(name)
    if str(name) in RECIPES:
        return Path(str(resources.files("ctmae") / "recipes" / f"{name}.yaml"))
    raise ValueError(f"{name}: no such config file, and not a recipe ({', '.join(RECIPES)})")


@dataclass(frozen=True)
class DataConfig:
    crops_per_volume: int = 4  # random crops drawn each time a cached volume is read
    flip: bool = False  # pretraining mirrors each crop left-right (RAS x) with probability 1/2
    zoom: float = 0.0  # > 0: each pretraining crop is scaled by s, log-uniform in [1/(1+zoom), 1+zoom] (anatomy of
    # other sizes: patients differ; a cube of crop·s voxels is read and resampled trilinearly to the crop)
    contrast: float = 0.0  # > 0: each pretraining crop's 0..1 intensities x become x^g, g log-uniform in
    # [1/(1+contrast), 1+contrast] (scanners, doses and contrast agent shift soft tissue; air and the top stay put)
    workers: int | None = None  # DataLoader worker processes (0: load in the training process; None: planned from
    # the CPU budget and /dev/shm by the command, ctmae.runtime.resources; in-process where nothing planned it)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "mae3d"  # architecture in ctmae.mae.model.ARCHITECTURES: mae3d (MONAI-compatible ViT) | primus
    # (nnU-Net's Primus encoder, for nnUNetv2_train -pretrained_weights; needs the nnunet extra)
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
    mlp_ratio: float = 4.0  # MLP hidden width / model width (primus: EVA's SwiGLU, 8/3 in nnU-Net's trainers)
    qkv_bias: bool = True  # bias on the fused q/k/v projection (MONAI's ViT must be built with the same value)
    norm_pix_loss: bool = False  # normalise each target patch to zero mean, unit variance (MAE's option)
    head: str = "linear"  # decoder's voxel head: linear (MAE's) | upsample (two transposed convolutions per patch) |
    # smooth (with fill_sigma: a residual on the fill's 4x coarser grid, interpolated across patch borders)
    fill_sigma: float = 0.0  # > 0: the decoder predicts the residual over a gaussian fill (sigma in voxels) of the
    # visible voxels; 0: the voxels themselves (MAE's)
    fill_queries: bool = False  # with fill_sigma: each decoder query reads its patch's fills at several widths
    fill_context: int = 0  # with fill_sigma: voxels (a multiple of the patch) read around each training crop for its
    # fills only, hidden in blocks like the crop; reconstruct then fills from the whole scan, as the model learned

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
    # A section of its own (not a field of ``data``): the preprocess stage, the cache, the export's contract and a
    # fine-tune read exactly this, and it holds the same type in both run configs.
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        check(self)

    @classmethod
    def recipe(cls, name: str | os.PathLike) -> RunConfig:
        """A recipe shipped in ctmae/recipes/ by name (``demo``, ``gpu``), or a YAML file (``recipe_path``)."""
        return cls.load_yaml(recipe_path(name))

    @classmethod
    def expand(cls, d: dict[str, Any], base: RunConfig) -> tuple[dict[str, Any], RunConfig]:
        """A ``model.size`` preset of the ``model.arch`` brings its widths (other model keys refine it; another arch
        without a size gets the same-named preset or its default); ``preprocess.crop`` sets the model's ``img_size``
        too (one crop size for both). The flat layout's ``data.spacing`` etc. are lifted."""
        d = lift_flat_layout(d)
        model = d.get("model") or {}
        if isinstance(model, dict) and model.get("arch", base.model.arch) != base.model.arch:  # the new arch's preset
            presets = PRESETS.get(model["arch"], {})
            size = base.model.size if base.model.size in presets else DEFAULT_SIZE.get(model["arch"], base.model.size)
            model = d["model"] = {"size": size, **model}
        if isinstance(model, dict) and "size" in model:
            arch = model.get("arch", base.model.arch)
            presets = PRESETS.get(arch, MODEL_PRESETS)
            if model["size"] not in presets:
                raise ValueError(f"unknown {arch} model size {model['size']!r}; choose one of {', '.join(presets)}")
            base = dataclasses.replace(base, model=dataclasses.replace(base.model, **presets[model["size"]]))
        pre = d.get("preprocess") or {}
        if isinstance(pre, dict) and "crop" in pre and isinstance(model, dict):
            d["model"] = {"img_size": pre["crop"], **model}
        return d, base


def check(cfg: RunConfig) -> None:
    """Cross-field checks; ValueError with what was given."""
    m, d, k, t = cfg.model, cfg.data, cfg.mask, cfg.train
    crop = cfg.preprocess.crop
    if m.patch < 1 or m.img_size % m.patch:
        raise ValueError(f"crop {m.img_size} must be a positive multiple of the patch size {m.patch}")
    if crop != m.img_size:
        raise ValueError(f"preprocess.crop ({crop}) and model.img_size ({m.img_size}) must be equal")
    if m.head not in ("linear", "upsample", "smooth") or (m.head == "upsample" and m.patch % 4):
        raise ValueError(f"model.head must be linear, upsample (patch divisible by 4) or smooth, got {m.head!r}")
    if m.head == "smooth" and not m.fill_sigma:
        raise ValueError("model.head smooth predicts a residual over a fill: it needs model.fill_sigma > 0")
    if m.fill_queries and not m.fill_sigma:
        raise ValueError("model.fill_queries needs model.fill_sigma > 0 (the fill the decoder corrects)")
    if m.fill_context and (not m.fill_sigma or m.fill_context < 0 or m.fill_context % m.patch):
        raise ValueError(
            f"model.fill_context ({m.fill_context}) needs model.fill_sigma > 0 and a multiple of the patch ({m.patch})"
        )
    if m.dim % m.heads or m.dec_dim % m.dec_heads:
        raise ValueError(f"widths must divide by heads: dim {m.dim}/{m.heads}, dec_dim {m.dec_dim}/{m.dec_heads}")
    if m.arch == "primus":
        check_primus(m)
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
    check_common(t)


def check_primus(m: ModelConfig) -> None:
    """What nnU-Net's Primus needs: its 8³ patches and a head width whose rotary encoding splits over three axes."""
    if m.patch != PRIMUS_PATCH:
        raise ValueError(f"model.arch primus embeds {PRIMUS_PATCH}³ patches as nnU-Net's Primus does, got {m.patch}")
    head = m.dim // m.heads
    if head % 6:  # EVA's 3D rotary encoding uses head/1.5 channels, in 4s: 2 (sin, cos) per band per axis
        raise ValueError(f"model.arch primus needs dim/heads divisible by 6 (rotary encoding), got {m.dim}/{m.heads}")
