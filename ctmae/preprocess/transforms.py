"""The deterministic preprocessing as MONAI dictionary transforms: load, orientation to RAS, resampling, HU window,
crop to the body, padding to the crop size. Every step is invertible, which brings results back to a scan's grid."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    MapTransform,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)
from monai.utils import ensure_tuple

from ctmae.io.discovery import files_label
from ctmae.io.labels import refuse_label_map
from ctmae.io.volume import CTReader
from ctmae.preprocess.config import PreprocessConfig


class LoadCTd(MapTransform):
    """Load volumes with ``CTReader`` alone, as MetaTensors carrying the RAS affine.

    Not ``LoadImaged``: MONAI's LoadImage registers every installed reader and falls back to them when the designated
    one refuses a file, which would let NaN-filled or truncated volumes through (and some readers warn at creation).
    """

    def __init__(self, keys: Sequence[str]) -> None:
        super().__init__(keys)
        self.reader = CTReader()

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = self.reader.read(d[key])
            if key == "image":  # labels are read as labels (finetune-seg); an image must not be one
                refuse_label_map(image, files_label(ensure_tuple(d[key])))
            array, meta = self.reader.get_data(image)
            d[key] = MetaTensor(torch.from_numpy(array), meta=meta)  # meta["affine"] becomes .affine
        return d


def preprocess_transforms(cfg: PreprocessConfig, label: bool = False, pad: bool = True) -> Compose:
    """The deterministic chain: {"image": files} -> {"image": MetaTensor (1, X, Y, Z) float32 in 0..1, RAS}.

    With ``label``, a "label" key (a label volume on the image's grid) follows every spatial step with
    nearest-neighbour resampling, so image and label stay aligned. Every step is invertible (``Compose.inverse``),
    which brings results back to the source geometry. ``pad=False`` leaves out the final padding to the crop size.
    """
    lo, hi = cfg.hu_window
    keys = ["image", "label"] if label else ["image"]
    return Compose(
        [
            LoadCTd(keys),
            EnsureChannelFirstd(keys, channel_dim="no_channel"),
            *ras_grid(keys, cfg),
            ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
            CropForegroundd(keys, source_key="image", select_fn=functools.partial(torch.gt, other=cfg.body_threshold)),
            *([SpatialPadd(keys, spatial_size=(cfg.crop,) * 3, value=0.0)] if pad else []),
        ]
    )


def ras_grid(keys: list[str], cfg: PreprocessConfig, lazy: bool = False) -> list[MapTransform]:
    """Orientation to RAS, then resampling to ``cfg.spacing`` (bilinear for the image, nearest for a label)."""
    return [
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")), lazy=lazy),
        Spacingd(keys, pixdim=cfg.spacing, mode=["bilinear", "nearest"][: len(keys)], dtype=torch.float32, lazy=lazy),
    ]
