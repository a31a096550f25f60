"""Reading a shared encoder back: from an export folder (safetensors or MONAI bundle) or an MAE checkpoint, into
MONAI's ``ViT`` or ``UNETR``. These back ``ctmae.load_encoder`` and ``ctmae.load_unetr``.

An export is trusted only as far as it checks out: its tensors must be exactly those of the ``ViT`` its config
describes (names and shapes), and their SHA-256 must equal the one recorded at export time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import UNETR, ViT

from ctmae.infer.sliding import LoadedModel, load_model
from ctmae.mae.blocks import sincos_embedding_3d
from ctmae.mae.config import ModelConfig, RunConfig
from ctmae.preprocess.config import PreprocessConfig
from ctmae.runtime.checkpoint import CheckpointError
from ctmae.runtime.device import resolve_device
from ctmae.seg.network import build_unetr, copy_encoder, net_config_from_mae
from ctmae.share.bundle import CTMAE_KEY, METADATA, WEIGHTS, is_bundle
from ctmae.share.describe import (
    CONFIG_FILE,
    EXPORT_FORMAT,
    EXPORT_VERSION,
    WEIGHTS_FILE,
    describe_checkpoint,
    monai_vit,
    tensors_sha256,
)

_POS_KEY = "patch_embedding.position_embeddings"


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder laid out as a ctmae export (either format)."""
    folder = Path(path)
    return folder.is_dir() and ((folder / CONFIG_FILE).is_file() or is_bundle(folder))


def read_export(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of an export folder, checked: names and shapes against the config's ViT, then SHA-256.

    Raises:
        CheckpointError: one line naming the file: not an export, unreadable, another format version, shapes that
            do not match config.json, or weights whose digest differs from the recorded one.
    """
    folder = Path(folder)
    if is_bundle(folder):
        config_path, weights_path = folder / METADATA, folder / WEIGHTS
        config = _json(config_path).get(CTMAE_KEY)
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: a MONAI bundle, but not one exported by ctmae (no '{CTMAE_KEY}')")
        tensors = _torch_weights(weights_path)
    elif (folder / CONFIG_FILE).is_file():
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        config = _json(config_path)
        tensors = _safetensors(weights_path)
    else:
        raise CheckpointError(f"{folder}: not a ctmae export (no {CONFIG_FILE} or {METADATA} and {WEIGHTS})")
    if config.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{config_path}: not a ctmae encoder export (format {config.get('format')!r})")
    if config.get("format_version") != EXPORT_VERSION:
        raise CheckpointError(
            f"{config_path}: export format version {config.get('format_version')} is not supported "
            f"(this ctmae reads version {EXPORT_VERSION})"
        )
    check_tensors(config, tensors, weights_path, config_path.name)
    return config, tensors


def check_tensors(config: dict[str, Any], tensors: dict[str, torch.Tensor], weights: Path, config_name: str) -> None:
    """Raise CheckpointError unless ``tensors`` are exactly the ViT's of ``config`` and match its SHA-256."""
    target = monai_vit(config.get("architecture") or {}, str(weights.parent / config_name)).state_dict()
    for key, value in tensors.items():
        if key not in target:
            raise CheckpointError(f"{weights}: tensor {key!r} has no place in the ViT {config_name} describes")
        if tuple(value.shape) != tuple(target[key].shape):
            raise CheckpointError(
                f"{weights}: tensor {key!r} has shape {tuple(value.shape)}, but the ViT {config_name} describes needs "
                f"{tuple(target[key].shape)}; the weights and {config_name} do not belong together"
            )
    missing = [k for k in target if k not in tensors]
    if missing:
        raise CheckpointError(f"{weights}: lacks tensor {missing[0]!r} ({len(missing)} missing)")
    recorded = (config.get("weights") or {}).get("sha256")
    if recorded and tensors_sha256(tensors) != recorded:
        raise CheckpointError(f"{weights}: weights differ from the SHA-256 in {config_name} (changed or corrupt)")


def read_encoder(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, ViT tensors) of an export folder or an MAE checkpoint."""
    return read_export(path) if Path(path).is_dir() else describe_checkpoint(path)


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu", img_size: int | None = None) -> ViT:
    """MONAI's ``ViT`` holding a ctmae encoder, in eval mode on ``device``.

    Args:
        path: an export folder (``ctmae export``, either format) or an MAE checkpoint (``.pt``).
        device: where the network goes.
        img_size: crop edge to build the ViT for; default the training crop. Another size recomputes the fixed
            sin-cos position table for the new token grid exactly (no interpolation).

    Raises:
        CheckpointError: a file that is not a ctmae encoder, or weights that do not match their config.
    """
    config, tensors = read_encoder(path)
    arguments, tensors = _resized(config["architecture"], tensors, img_size)
    vit = monai_vit(arguments)
    vit.load_state_dict(tensors)
    return vit.to(device).eval()


class ExportedEncoder(torch.nn.Module):
    """An export's MONAI ``ViT`` behind the MAE's ``encode``: the encoder alone, no decoder."""

    def __init__(self, vit: ViT) -> None:
        super().__init__()
        self.vit = vit

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Features of every token of crops (B, C, c, c, c) -> (B, L, D), in the MAE encoder's token order."""
        return self.vit(images)[0]


def load_encoder_model(path: str | os.PathLike, device: str) -> LoadedModel:
    """What ``ctmae embed`` runs: an MAE checkpoint's model (``ctmae.infer.sliding.load_model``), or an export
    folder's encoder with the preprocessing its config records (no training-scan reference: shift scores are NaN).

    Raises:
        CheckpointError: as ``load_model`` for files, as ``read_export`` for folders.
    """
    if not Path(path).is_dir():
        return load_model(path, device)
    config, tensors = read_export(path)
    vit = monai_vit(config["architecture"])
    vit.load_state_dict(tensors)
    dev = resolve_device(device)
    pre, training = config["preprocessing"], config.get("training", {})
    cfg = RunConfig(
        model=model_config(config["architecture"], training.get("model_size", "custom")),
        preprocess=PreprocessConfig(tuple(pre["spacing"]), tuple(pre["hu_window"]), int(pre["crop"])),
    )
    return LoadedModel(ExportedEncoder(vit).to(dev).eval(), cfg, int(training.get("step") or 0), dev)


def load_unetr(path: str | os.PathLike, num_classes: int, feature_size: int = 16, img_size: int | None = None) -> UNETR:
    """MONAI's ``UNETR`` whose ViT holds a ctmae encoder (decoder randomly initialised), ready to fine-tune.

    Args:
        path: an export folder or an MAE checkpoint.
        num_classes: output channels, background included.
        feature_size: UNETR's convolutional width.
        img_size: crop edge (a multiple of 16); default the training crop.

    Raises:
        ValueError: an encoder UNETR cannot hold (patches other than 16³, depth other than 12, several channels).
        CheckpointError: as ``load_encoder``.
    """
    config, tensors = read_encoder(path)
    model = model_config(config["architecture"], config.get("training", {}).get("model_size", "custom"))
    net = net_config_from_mae(model, feature_size, num_classes)
    unetr = build_unetr(net, img_size or model.img_size)
    copy_encoder(unetr, {f"encoder.{k}": v for k, v in tensors.items()})
    return unetr


def model_config(arch: dict[str, Any], size: str = "custom") -> ModelConfig:
    """The encoder half of a ``ModelConfig`` from an export's MONAI ``ViT`` arguments (``config.json``)."""
    return ModelConfig(
        size=size,
        img_size=arch["img_size"][0],
        patch=arch["patch_size"][0],
        in_chans=arch["in_channels"],
        dim=arch["hidden_size"],
        depth=arch["num_layers"],
        heads=arch["num_heads"],
        mlp_ratio=arch["mlp_dim"] / arch["hidden_size"],
        qkv_bias=arch["qkv_bias"],
    )


def _resized(
    arch: dict[str, Any], tensors: dict[str, torch.Tensor], img_size: int | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if img_size is None or [img_size] * 3 == list(arch["img_size"]):
        return arch, tensors
    patch = arch["patch_size"][0]
    if img_size < patch or img_size % patch:
        raise ValueError(f"img_size {img_size} must be a positive multiple of the patch size {patch}")
    table = sincos_embedding_3d(img_size // patch, arch["hidden_size"])  # (1, L, D), as ctmae trained with
    return {**arch, "img_size": [img_size] * 3}, {**tensors, _POS_KEY: table}


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a ctmae export config (expected a JSON object)")
    return data


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: missing (an export folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None


def _torch_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable state dict ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a plain state dict of tensors")
    return state
