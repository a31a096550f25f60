"""Checkpoints: atomic save, safe load (``weights_only=True``), format checks, and the model they rebuild.

A checkpoint is a plain dict of tensors and primitives: ``format``, ``format_version``, ``config`` (the run's
``RunConfig.to_dict()``), ``model``, ``step`` and, for training state, ``optimizer``, ``scheduler``, ``scaler`` and
``rng``. The model is rebuilt from the config alone (``model_from_checkpoint``).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ctmae.config import FORMAT_VERSION, RunConfig
from ctmae.model import MaskedAutoencoder3D

FORMAT = "ctmae-mae3d"


class CheckpointError(Exception):
    """A checkpoint that cannot be used, as one line naming the file."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` plus format tags to ``path`` atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a ctmae checkpoint safely. Raises CheckpointError for missing, corrupt, foreign or incompatible files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).splitlines()[0] if "weights_only" not in str(e) else "it holds objects that could run code"
        raise CheckpointError(f"{path}: refused to load: {reason}") from None
    except Exception as e:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a ctmae checkpoint (written by another program)")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {state.get('format_version')} is not supported "
            f"(this ctmae reads version {FORMAT_VERSION})"
        )
    try:
        state["config"] = RunConfig.from_dict(state["config"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: checkpoint config is invalid: {e}") from None
    return state


def model_from_checkpoint(state: dict[str, Any]) -> MaskedAutoencoder3D:
    """Rebuild the MAE from a loaded checkpoint's config and weights."""
    model = MaskedAutoencoder3D(state["config"].model)
    model.load_state_dict(state["model"])
    return model


def rng_state() -> dict[str, Any]:
    """Torch RNG states (CPU and every CUDA device) for exact resumption."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
