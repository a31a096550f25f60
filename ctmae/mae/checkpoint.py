"""Pretraining checkpoints: load one as a ``RunConfig`` and weights, rebuild the MAE from it."""

from __future__ import annotations

import os
from typing import Any

import torch

from ctmae.mae.config import RunConfig
from ctmae.mae.model import MaskedAutoencoder3D, build_model
from ctmae.runtime.checkpoint import FORMAT, CheckpointError, read_checkpoint


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a pretraining checkpoint (see ``read_checkpoint``); ``state["config"]`` becomes a RunConfig."""
    state = read_checkpoint(path, FORMAT, map_location)
    try:
        state["config"] = RunConfig.from_dict(state["config"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: checkpoint config is invalid: {e}") from None
    return state


def model_from_checkpoint(state: dict[str, Any]) -> MaskedAutoencoder3D:
    """Rebuild the MAE from a loaded checkpoint's config and weights."""
    model = build_model(state["config"].model)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint weights do not match its own config: {str(e).splitlines()[0]}") from None
    return model
