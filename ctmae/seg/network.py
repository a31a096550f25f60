"""The segmentation network: MONAI's UNETR, its ViT initialised from a ctmae MAE encoder; seg checkpoints.

Our encoder mirrors MONAI's ViT parameter names (see ``ctmae.mae.model``), so ``encoder.*`` tensors of an MAE checkpoint
load into ``unetr.vit`` by name. MONAI's ``norm_cross_attn`` (unused without cross-attention) has no counterpart and
keeps its init; our fixed sin-cos position embedding loads into UNETR's learnable one, recomputed exactly for another
crop size.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from monai.networks.nets import UNETR
from torch import nn

from ctmae.mae.blocks import sincos_embedding_3d
from ctmae.mae.config import ModelConfig
from ctmae.runtime.checkpoint import SEG_FORMAT, CheckpointError, read_checkpoint, save_checkpoint
from ctmae.seg.config import UNETR_DEPTH, UNETR_PATCH, SegConfig, SegNetConfig

_POS_KEY = "patch_embedding.position_embeddings"


def build_unetr(net: SegNetConfig, crop: int) -> UNETR:
    """A one-channel UNETR for ``crop``³ inputs with the ViT sizes of ``net`` (random init).

    MONAI's transformer blocks carry a ``norm_cross_attn`` that UNETR never uses; it is frozen so that every trainable
    parameter receives a gradient (DistributedDataParallel requires that).
    """
    unetr = UNETR(
        in_channels=1,
        out_channels=net.num_classes,
        img_size=crop,
        feature_size=net.feature_size,
        hidden_size=net.dim,
        mlp_dim=int(net.dim * net.mlp_ratio),
        num_heads=net.heads,
        proj_type="conv",
        qkv_bias=net.qkv_bias,
    )
    for name, p in unetr.named_parameters():
        if "norm_cross_attn" in name:
            p.requires_grad_(False)
    return unetr


def net_config_from_mae(model: ModelConfig, feature_size: int, num_classes: int) -> SegNetConfig:
    """The UNETR sizes that hold an MAE encoder; ValueError when the architecture, patch size, depth or channels
    cannot fit."""
    if model.arch == "primus":
        raise ValueError(
            "the checkpoint's encoder is nnU-Net's Primus, which MONAI's UNETR cannot hold: fine-tune it in nnU-Net "
            "(ctmae export CHECKPOINT --format nnunet --out DIR writes the weights and the commands)"
        )
    if model.patch != UNETR_PATCH:
        raise ValueError(
            f"the checkpoint's encoder uses {model.patch}³ patches; MONAI's UNETR needs 16³ (pretrain with --patch 16)"
        )
    if model.depth != UNETR_DEPTH:
        raise ValueError(
            f"the checkpoint's encoder has {model.depth} blocks ({model.size} preset); MONAI's UNETR "
            f"needs exactly 12 (use the tiny, small or base preset)"
        )
    if model.in_chans != 1:
        raise ValueError(f"the checkpoint's encoder reads {model.in_chans} channels; finetune-seg needs 1")
    return SegNetConfig(
        size=model.size,
        dim=model.dim,
        heads=model.heads,
        mlp_ratio=model.mlp_ratio,
        qkv_bias=model.qkv_bias,
        feature_size=feature_size,
        num_classes=num_classes,
    )


def copy_encoder(unetr: UNETR, mae_weights: dict[str, torch.Tensor]) -> int:
    """Copy the MAE's ``encoder.*`` tensors into ``unetr.vit``; returns how many tensors were loaded.

    The position embedding is recomputed with ``sincos_embedding_3d`` when UNETR's token grid differs from the
    checkpoint's: ours is a fixed sin-cos table, so this is exact (no interpolation).

    Raises:
        ValueError: a tensor is missing from the checkpoint or its shape does not fit (e.g. another width).
    """
    encoder = {k.removeprefix("encoder."): v for k, v in mae_weights.items() if k.startswith("encoder.")}
    target = unetr.vit.state_dict()
    if _POS_KEY in encoder and encoder[_POS_KEY].shape != target[_POS_KEY].shape:
        tokens, dim = target[_POS_KEY].shape[1:]
        grid = round(tokens ** (1 / 3))
        if encoder[_POS_KEY].shape[-1] == dim:  # same width, other crop: rebuild the table for this grid
            encoder[_POS_KEY] = sincos_embedding_3d(grid, dim)
    for key, value in encoder.items():
        if key not in target:
            raise ValueError(f"the checkpoint's encoder tensor {key!r} has no place in MONAI's ViT")
        if value.shape != target[key].shape:
            raise ValueError(
                f"the checkpoint's encoder tensor {key!r} has shape {tuple(value.shape)}, UNETR's ViT "
                f"needs {tuple(target[key].shape)}"
            )
    missing = [k for k in target if k not in encoder and ".norm_cross_attn." not in k]
    if missing:
        raise ValueError(f"the checkpoint lacks encoder tensor {missing[0]!r} ({len(missing)} missing)")
    unetr.vit.load_state_dict(encoder, strict=False)
    return len(encoder)


def vit_depth(name: str) -> int | None:
    """Depth of a UNETR parameter in its ViT for layer-wise LR decay: 0 patch embedding, k+1 block k, 13 final
    norm; None for the convolutional decoder."""
    if not name.startswith("vit."):
        return None
    parts = name.split(".")
    if parts[1] == "patch_embedding":
        return 0
    if parts[1] == "blocks":
        return int(parts[2]) + 1
    return UNETR_DEPTH + 1


def param_groups(unetr: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: lr scaled by ``layer_decay`` per ViT depth below the top, no decay on 1-D tensors."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in unetr.named_parameters():
        if not p.requires_grad:
            continue
        depth = vit_depth(name)
        scale = 1.0 if depth is None else layer_decay ** (UNETR_DEPTH + 1 - depth)
        groups.setdefault((lr * scale, weight_decay if p.ndim > 1 else 0.0), []).append(p)
    return [{"params": ps, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in groups.items()]


def save_seg_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Atomic save (``ctmae.runtime.checkpoint.save_checkpoint``) with the segmentation format tag."""
    save_checkpoint({**state, "task": "segmentation"}, path, fmt=SEG_FORMAT)


def load_seg_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a segmentation checkpoint safely (``read_checkpoint``); ``state["config"]`` becomes a SegConfig.

    Raises:
        CheckpointError: one line for missing, corrupt, foreign, wrong-kind or incompatible files.
    """
    state = read_checkpoint(path, SEG_FORMAT, map_location)
    try:
        state["config"] = SegConfig.from_dict(state["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: checkpoint config is invalid: {e}") from None
    return state


def segmenter_from_checkpoint(state: dict[str, Any]) -> UNETR:
    """Rebuild the UNETR from a loaded segmentation checkpoint's config and weights."""
    cfg: SegConfig = state["config"]
    unetr = build_unetr(cfg.net, cfg.preprocess.crop)
    unetr.load_state_dict(state["model"])
    return unetr
