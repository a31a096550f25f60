"""``ctmae export``: a pretrained MAE's encoder as a folder others load without ctmae.

Three layouts. ``safetensors``: ``encoder.safetensors`` (the weights of MONAI's ``ViT``, by MONAI's names),
``config.json`` (the ``ViT``'s arguments, the preprocessing contract, a training summary, a SHA-256 of the tensors)
and a ``README.md`` model card. ``monai-bundle``: MONAI's bundle layout (``ctmae.share.bundle``). ``nnunet``: a Primus
encoder for ``nnUNetv2_train -pretrained_weights`` (``ctmae.share.nnunet``). The first two hold the same
``config.json`` content, copy no path but the checkpoint's file name and no DICOM tag, and are written file by file
atomically (``ctmae.runtime.files``).

The encoder's parameter names already match MONAI's ``ViT`` (``ctmae.mae.model``); the export loads them into a real
``ViT`` built from the config and writes that ``ViT``'s whole state dict, so ``ViT(**config["architecture"])``
loads it strictly. Its ``norm_cross_attn`` layers, unused without cross-attention, keep their initial ones/zeros.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ctmae.runtime.files import atomic_path, atomic_write_json, atomic_write_text
from ctmae.share.describe import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, describe_checkpoint

FORMATS = ("safetensors", "monai-bundle", "nnunet")  # nnunet: ctmae.share.nnunet, for a Primus encoder


class OutputExists(ValueError):
    """The export folder holds files and ``overwrite`` was not given."""


def prepare_out(out: Path, overwrite: bool) -> None:
    """Create ``out``; a non-empty folder is refused (``OutputExists``) unless ``overwrite``, which empties it."""
    if out.exists() and not out.is_dir():
        raise OutputExists(f"{out}: --out must be a folder, but a file is there")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputExists(f"{out}: folder is not empty; pass --overwrite to replace its contents")
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "ctmae"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates its file private (0600); exports are for sharing


def export(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "safetensors",
    overwrite: bool = False,
    patch_size: tuple[int, int, int] | None = None,
    num_classes: int = 2,
):
    """Export an MAE checkpoint's encoder to ``out`` in format ``fmt``; returns (config, files written).

    ``patch_size`` (None: the pretraining crop) and ``num_classes`` size the network of the ``nnunet`` format
    (``ctmae.share.nnunet``).

    Raises:
        ValueError: an unknown format; OutputExists: a non-empty ``out`` without ``overwrite``.
        CheckpointError: a foreign, corrupt or segmentation checkpoint, or an encoder that does not fit the format.
    """
    from ctmae.share.bundle import write_bundle
    from ctmae.share.model_card import model_card

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "nnunet":  # the checkpoint is read and checked before the folder is touched, as for the others
        from ctmae.share.nnunet import describe_nnunet, write_nnunet

        config, weights, fragment = describe_nnunet(checkpoint, patch_size, num_classes)
        prepare_out(Path(out), overwrite)
        return config, write_nnunet(Path(out), config, weights, fragment)
    config, tensors = describe_checkpoint(checkpoint)
    out = Path(out)
    prepare_out(out, overwrite)
    if fmt == "monai-bundle":
        return config, write_bundle(out, config, tensors)
    write_safetensors(out / WEIGHTS_FILE, tensors)
    atomic_write_json(out / CONFIG_FILE, config)
    atomic_write_text(out / CARD_FILE, model_card(config, "safetensors"))
    return config, [out / WEIGHTS_FILE, out / CONFIG_FILE, out / CARD_FILE]
