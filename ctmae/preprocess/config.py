"""Preprocessing settings: the one type every preprocessing step, cache entry, checkpoint and export describes.

``PreprocessConfig`` is the ``preprocess`` section of both run configs (pretraining's and fine-tuning's): the grid a
scan is resampled to, the HU window, the edge volumes are padded to (the training crop and sliding window), and the
cache folder. Run configs written before this section existed kept these keys in ``data``; ``lift_flat_layout``
moves them, so old ``config.yaml`` files and checkpoints load unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BODY_HU = -500.0  # voxels above this HU count as foreground (body) for the foreground crop
FLAT_KEYS = ("spacing", "hu_window", "crop", "cache_dir")  # preprocess keys that older configs held in ``data``


def default_cache_dir() -> str:
    """The preprocessing cache shared by all runs of this user: ``$XDG_CACHE_HOME/ctmae`` or ``~/.cache/ctmae``."""
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ctmae")


@dataclass(frozen=True)
class PreprocessConfig:
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)  # target voxel size in mm along RAS x, y, z
    hu_window: tuple[float, float] = (-1000.0, 1000.0)  # HU clipped to this range, then scaled to 0..1
    crop: int = 96  # volumes are padded to at least this edge: the training crop and sliding window, in voxels
    cache_dir: str = field(default_factory=default_cache_dir)  # preprocessed volumes, keyed by file and settings

    def __post_init__(self) -> None:
        if self.hu_window[0] >= self.hu_window[1] or min(self.spacing) <= 0 or self.crop < 1:
            raise ValueError(
                f"hu_window must be (low, high) with low < high, spacing positive and crop >= 1; got hu_window "
                f"{self.hu_window}, spacing {self.spacing}, crop {self.crop}"
            )

    @property
    def body_threshold(self) -> float:
        """The foreground (body) threshold ``BODY_HU`` in HU-window units (0..1)."""
        lo, hi = self.hu_window
        return min(max((BODY_HU - lo) / (hi - lo), 0.0), 0.99)


def lift_flat_layout(d: dict[str, Any]) -> dict[str, Any]:
    """A run config dict with the preprocessing keys of the flat layout (``data.spacing``, ``data.hu_window``,
    ``data.crop``, ``data.cache_dir``) moved into its ``preprocess`` section; other dicts come back as they are.

    Raises:
        ValueError: a key given in both places.
    """
    data = d.get("data")
    if not isinstance(data, dict) or not any(k in data for k in FLAT_KEYS):
        return d
    pre = d.get("preprocess") or {}
    if not isinstance(pre, dict):
        return d  # the section check (Sections.from_dict) names it
    both = sorted(k for k in FLAT_KEYS if k in data and k in pre)
    if both:
        raise ValueError(f"config key 'data.{both[0]}' is the older place of 'preprocess.{both[0]}': give one")
    lifted = {k: v for k, v in data.items() if k in FLAT_KEYS}
    rest = {k: v for k, v in data.items() if k not in FLAT_KEYS}
    return {**d, "data": rest, "preprocess": {**pre, **lifted}}
