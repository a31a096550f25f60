"""Checkpoints: atomic save, safe load (``weights_only=True``), format and kind checks, RNG state.

A checkpoint is a plain dict of tensors and primitives: ``format`` (its kind), ``format_version``, ``config`` (the
run's ``to_dict()``), ``model``, ``step`` and, for training state, ``optimizer``, ``scaler``, ``rng`` (and
fine-tuning's ``scheduler``; pretraining's learning rate is a function of the step). Each kind rebuilds its model from
the config alone (``ctmae.mae.checkpoint``, ``ctmae.seg.network``).
"""

from __future__ import annotations

import os
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from ctmae.runtime.files import atomic_path

FORMAT_VERSION = 2  # bump when checkpoint or config layout changes incompatibly

FORMAT = "ctmae-mae3d"  # pretraining checkpoints
SEG_FORMAT = "ctmae-unetr-seg"  # fine-tuned segmentation checkpoints (ctmae.seg.network)
# How each kind is named in messages, so a checkpoint of the wrong kind is told apart from a foreign file.
KINDS = {FORMAT: "an MAE pretraining checkpoint", SEG_FORMAT: "a fine-tuned segmentation checkpoint"}
# Where a command that needs this kind finds one.
WHERE = {
    FORMAT: "RUN_DIR/checkpoints/last.pt written by ctmae pretrain",
    SEG_FORMAT: "RUN_DIR/checkpoints/best.pt written by ctmae finetune-seg",
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
    except Exception as e:
        looks = _looks_like(path)
        if looks is not None:  # a scan, a text file, ...: say what it is, not why torch choked on it
            raise CheckpointError(f"{path}: not a ctmae checkpoint: it is {looks}; pass {_wanted(fmt)}") from None
        if isinstance(e, pickle.UnpicklingError):  # a pickle that weights_only refused: it would have run code
            reason = str(e).splitlines()[0] if "weights_only" not in str(e) else "it holds objects that could run code"
            raise CheckpointError(f"{path}: refused to load: {reason}") from None
        # a truncated or damaged torch file
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:120]})") from None
    found = state.get("format") if isinstance(state, dict) else None
    if found in KINDS and found != fmt:
        raise CheckpointError(f"{path}: {KINDS[found]}, not {KINDS[fmt]}; {_wrong_kind_hint(state)}")
    if found != fmt:
        raise CheckpointError(f"{path}: not a ctmae checkpoint (written by another program)")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {state.get('format_version')} is not supported "
            f"(this ctmae reads version {FORMAT_VERSION})"
        )
    return state


def _wanted(fmt: str) -> str:
    return f"{KINDS[fmt]} ({WHERE[fmt]})"


def _wrong_kind_hint(state: dict[str, Any]) -> str:
    """What to pass instead of a checkpoint of the other kind (the commands taking each kind are fixed)."""
    if state["format"] == FORMAT:  # only ctmae segment and finetune-seg --resume read segmentation checkpoints
        return f"--predict needs a fine-tuned one ({WHERE[SEG_FORMAT]})"
    config = state.get("config")
    origin = config.get("pretrained") if isinstance(config, dict) else None
    to_segment = "to segment scans with it, use ctmae segment"
    if origin:
        return f"pass the MAE pretraining checkpoint it was fine-tuned from ({origin}); {to_segment}"
    return f"it was trained from scratch: pass an MAE pretraining checkpoint ({WHERE[FORMAT]}); {to_segment}"


def _looks_like(path: Path) -> str | None:
    """What a file torch could not load looks like, from its first bytes; None for a pickle or a (damaged) torch
    zip, whose own error says more."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "an empty file"
    if head[:2] == b"\x1f\x8b":  # gzip: a .nii.gz scan, most likely
        try:
            inner = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 348)
        except zlib.error:
            inner = b""
        return "a gzip-compressed NIfTI image" if _is_nifti(inner) else "a gzip-compressed file"
    if _is_nifti(head):
        return "a NIfTI image"
    if head.startswith(b"NRRD"):
        return "an NRRD image"
    if head[128:132] == b"DICM":
        return "a DICOM file"
    if head.startswith(b"PK"):
        return _zip_kind(path)
    if head[:1] != b"\x80" and _is_text(head):  # pickles (protocol 2+, torch's legacy format) start with 0x80
        return "a text file"
    return None


def _is_nifti(head: bytes) -> bool:
    """NIfTI-1 (header size 348) or NIfTI-2 (540) in either byte order."""
    return head[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c", b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c")


def _is_text(head: bytes) -> bool:
    text = head.decode("utf-8", errors="ignore")  # a character cut at the 4096-byte boundary is dropped
    return len(text) >= len(head) - 3 and all(c.isprintable() or c in "\t\r\n" for c in text)


def _zip_kind(path: Path) -> str | None:
    """A readable zip without torch's data.pkl is some other archive; a torch zip or a damaged one gives None."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    return None if any(n.endswith("data.pkl") for n in names) else "a zip archive, not a torch file"


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
