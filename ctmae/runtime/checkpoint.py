"""Checkpoints: atomic save, safe load (``weights_only=True``), format and kind checks, RNG state.

A checkpoint is a plain dict of tensors and primitives: ``format`` (its kind), ``format_version``, ``config`` (the
run's ``to_dict()``), ``model``, ``step`` and, for training state, ``optimizer``, ``scaler``, ``rng`` (and
fine-tuning's ``scheduler``; pretraining's learning rate is a function of the step). Each kind rebuilds its model from
the config alone (``ctmae.mae.checkpoint``, ``ctmae.seg.network``).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ctmae.runtime.files import atomic_path

FORMAT_VERSION = 2  # bump when checkpoint or config layout changes incompatibly

FORMAT = "ctmae-mae3d"  # pretraining checkpoints
SEG_FORMAT = "ctmae-unetr-seg"  # fine-tuned segmentation checkpoints (ctmae.seg.network)
# How each kind is named in messages, so a checkpoint of the wrong kind is told apart from a foreign file.
KINDS = {FORMAT: "an MAE pretraining checkpoint", SEG_FORMAT: "a fine-tuned segmentation checkpoint"}
WRONG_KIND_HINT = {
    FORMAT: "pass an MAE pretraining checkpoint (to segment scans with it, use ctmae finetune-seg --predict)",
    SEG_FORMAT: "fine-tune it first (ctmae finetune-seg CHECKPOINT --images ... --labels ... --out RUN_DIR)",
}


class CheckpointError(Exception):
    """A checkpoint that cannot be used, as one line naming the file."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike, fmt: str = FORMAT) -> None:
    """Write ``state`` plus the format tags to ``path`` atomically: temp file in the same folder, fsync, rename.

    Raises:
        OutputError: one line naming ``path`` (a full disk is named as such); the previous file stays intact.
    """
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
        torch.save({**state, "format": fmt, "format_version": FORMAT_VERSION}, f)


def read_checkpoint(
    path: str | os.PathLike, fmt: str = FORMAT, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a ctmae checkpoint of kind ``fmt`` with ``weights_only=True``; its ``config`` stays a plain dict.

    Raises:
        CheckpointError: one line for a missing, corrupt, foreign, wrong-kind or incompatible file, or one that
            holds objects that could run code.
    """
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
    found = state.get("format") if isinstance(state, dict) else None
    if found in KINDS and found != fmt:
        raise CheckpointError(f"{path}: {KINDS[found]}, not {KINDS[fmt][3:]}; {WRONG_KIND_HINT[found]}")
    if found != fmt:
        raise CheckpointError(f"{path}: not a ctmae checkpoint (written by another program)")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {state.get('format_version')} is not supported "
            f"(this ctmae reads version {FORMAT_VERSION})"
        )
    return state


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
