"""How long a run trains and how fast it learns at each step: step count from epochs, warm-up + cosine decay."""

from __future__ import annotations

import math
from typing import Any

DEFAULT_STEPS = 1000


def resolve_steps(train: Any, num_volumes: int, crops_per_volume: int, global_batch: int) -> int:
    """Steps to train: ``train.steps``, else ``train.epochs`` passes over all crops (volumes x crops_per_volume)
    at the global batch (all processes together), else ``DEFAULT_STEPS``."""
    if train.steps is not None:
        return train.steps
    if train.epochs is not None:
        return max(1, math.ceil(train.epochs * num_volumes * crops_per_volume / global_batch))
    return DEFAULT_STEPS


def lr_factor(step: int, total: int, warmup: float, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` x total steps, then cosine decay to ``min_ratio`` of the peak."""
    warm = max(1, round(warmup * total))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
