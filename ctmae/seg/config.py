"""Fine-tuning configuration for ``finetune-seg``: preprocessing, labelled data, the UNETR it builds, and training.

Frozen dataclasses, stored as a plain dict in every segmentation checkpoint, so a segmenter is rebuilt from its
checkpoint alone (``SegConfig.from_dict``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ctmae.preprocess.config import PreprocessConfig, lift_flat_layout
from ctmae.runtime.config import Sections, check_common

UNETR_PATCH = 16  # MONAI's UNETR hard-codes 16³ patches
UNETR_DEPTH = 12  # ... and a 12-block ViT whose blocks 3, 6, 9 feed the skip connections


@dataclass(frozen=True)
class SegDataConfig:
    crops_per_volume: int = 4  # foreground-balanced crops drawn per visit of a labelled volume
    pos_fraction: float = 0.5  # share of crops centred on a labelled (non-zero) voxel
    workers: int | None = None  # DataLoader processes drawing crops (0: in the training process; None: planned
    # by the command from the CPU budget and /dev/shm)
    label_values: tuple[int, ...] = ()  # label value of each class 1..K (--classes; other values are background)
    class_names: tuple[str, ...] = ()  # name of each class 1..K ("" unnamed); () when the labels have no names


@dataclass(frozen=True)
class SegNetConfig:
    size: str = "base"  # preset the ViT widths came from (informative)
    dim: int = 768  # ViT width (hidden_size)
    heads: int = 12  # ViT attention heads
    mlp_ratio: float = 4.0  # ViT MLP width / dim
    qkv_bias: bool = True  # bias on the fused qkv projection, as in the MAE encoder
    feature_size: int = 16  # UNETR's convolutional feature width
    num_classes: int = 2  # output channels, background included


@dataclass(frozen=True)
class SegTrainConfig:
    steps: int | None = None  # optimiser steps; None: from epochs, or DEFAULT_STEPS
    epochs: float | None = None  # passes over all training crops; used when steps is None
    batch_size: int = 2  # crops per optimiser step
    lr: float = 1e-4  # peak learning rate, AdamW
    min_lr: float = 0.0  # learning rate at the end of the cosine decay
    warmup: float = 0.05  # share of steps with linear warm-up
    weight_decay: float = 1e-5
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    freeze_encoder: bool = False  # keep the ViT fixed; train only UNETR's convolutional decoder
    layer_decay: float = 1.0  # ViT block k of 12 learns at lr x layer_decay^(13 - k); 1 disables
    seed: int = 0  # seeds weights (from scratch / decoder), split, crop order, flips
    device: str = "auto"
    precision: str = "auto"
    val_every: int = 100  # steps between validations (and at the last step)
    log_every: int = 10  # steps between metrics.jsonl lines


@dataclass(frozen=True)
class SegConfig(Sections):
    # spacing and HU window from the MAE checkpoint; crop (training crop and sliding window) a multiple of 16
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    net: SegNetConfig = field(default_factory=SegNetConfig)
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
    pretrained: str = ""  # the MAE checkpoint the encoder came from; "" when trained from scratch

    def __post_init__(self) -> None:
        check(self)

    @classmethod
    def expand(cls, d: dict[str, Any], base: SegConfig) -> tuple[dict[str, Any], SegConfig]:
        """The flat layout's ``data.spacing``, ``data.hu_window``, ``data.crop`` are lifted into ``preprocess``."""
        return lift_flat_layout(d), base


def check(cfg: SegConfig) -> None:
    """Cross-field checks; ValueError with what was given."""
    d, n, t, crop = cfg.data, cfg.net, cfg.train, cfg.preprocess.crop
    if crop < UNETR_PATCH or crop % UNETR_PATCH:
        raise ValueError(f"crop {crop} must be a positive multiple of 16 (UNETR's patch size)")
    if n.dim % n.heads:
        raise ValueError(f"ViT width {n.dim} must divide by its {n.heads} heads")
    if n.num_classes < 2 or n.feature_size < 1:
        raise ValueError(
            f"num_classes must be >= 2 (background included) and feature_size >= 1, got "
            f"{n.num_classes} and {n.feature_size}"
        )
    k = n.num_classes - 1
    if d.label_values and (
        len(set(d.label_values)) != k or len(d.label_values) != k or not all(0 < v < 256 for v in d.label_values)
    ):
        raise ValueError(f"label_values must be {k} distinct label values 1..255 (one per class), got {d.label_values}")
    if d.class_names and len(d.class_names) != k:
        raise ValueError(f"class_names must name {k} classes (background excluded), got {len(d.class_names)}")
    if not 0.0 <= d.pos_fraction <= 1.0 or d.crops_per_volume < 1 or (d.workers or 0) < 0:
        raise ValueError(f"pos_fraction must be in 0..1, crops_per_volume >= 1, workers >= 0; got {d}")
    if not 0.0 < t.layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {t.layer_decay}")
    if t.batch_size < 1 or t.val_every < 1 or t.log_every < 1:
        raise ValueError("batch_size, val_every and log_every must be >= 1")
    check_common(t)
