"""``ctmae export --format nnunet``: a pretrained Primus MAE as the ``-pretrained_weights`` file of
``nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNet_Primus_{S,B,M,L}_Trainer``.

nnU-Net's ``load_pretrained_weights`` requires every key of the trainer's network (but ``.seg_layers.``, which Primus
has none of) with the same shape. The export therefore builds that network itself, for the target patch size and
number of classes (``ctmae.mae.primus.primus_network``, the trainer's arguments), copies the pretrained encoder
(``down_projection``, ``eva``) into it and saves its whole state dict: the segmentation decoder (``up_projection``)
keeps the trainer's own initialisation. Beside the weights: ``plans_fragment.json`` (the plans entries that make
nnU-Net's preprocessing match ctmae's), ``config.json`` and a README with the exact commands.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ctmae.mae.config import PRIMUS_PATCH, RunConfig
from ctmae.preprocess.contract import preprocessing_of
from ctmae.runtime.checkpoint import CheckpointError
from ctmae.runtime.files import atomic_path, atomic_write_json, atomic_write_text
from ctmae.share.describe import load_mae_state, tensors_sha256, training_of

WEIGHTS, PLANS, CONFIG, CARD = "pretrained_weights.pth", "plans_fragment.json", "config.json", "README.md"
TRAINERS = {"s": "nnUNet_Primus_S_Trainer", "b": "nnUNet_Primus_B_Trainer", "m": "nnUNet_Primus_M_Trainer"}
TRAINERS["l"] = "nnUNet_Primus_L_Trainer"
FINETUNE_DROP_PATH = 0.2  # nnU-Net's Primus trainers (no weights: any value builds the same keys)
READER = "NibabelIOWithReorient"  # nnU-Net's reader that reorients to RAS: its arrays are ctmae's, axes reversed
_POS_KEY = "eva.pos_embed"


def patch_size_of(values: list[int]) -> tuple[int, int, int]:
    """``--patch-size`` (one number or three, nnU-Net's plans order) as three multiples of Primus's 8³ patch."""
    if len(values) not in (1, 3):
        raise ValueError(f"--patch-size takes one number or three, got {len(values)}")
    size = tuple(int(v) for v in values) * (3 if len(values) == 1 else 1)
    if any(v < PRIMUS_PATCH or v % PRIMUS_PATCH for v in size):
        raise ValueError(f"--patch-size must be multiples of Primus's {PRIMUS_PATCH}³ patch, got {list(size)}")
    return size


def primus_weights(
    model_weights: dict[str, torch.Tensor], cfg: RunConfig, patch_size: tuple[int, int, int], num_classes: int
) -> tuple[dict[str, torch.Tensor], bool]:
    """(every tensor of the trainer's network with the pretrained encoder in it, whether the absolute position table
    was resampled to ``patch_size``).

    Raises:
        CheckpointError: an encoder tensor that has no place in the network or another shape.
    """
    from ctmae.mae.primus import primus_network

    with torch.random.fork_rng(devices=[]):  # the decoder's init repeats: the same export gives the same file
        torch.manual_seed(0)
        net = primus_network(cfg.model, patch_size, num_classes, FINETUNE_DROP_PATH)
    target = net.state_dict()
    encoder = {k.removeprefix("encoder."): v.float() for k, v in model_weights.items() if k.startswith("encoder.")}
    resampled = encoder[_POS_KEY].shape != target[_POS_KEY].shape
    if resampled:
        encoder[_POS_KEY] = resample_positions(encoder[_POS_KEY], cfg.model.grid, patch_size, cfg.model.patch)
    for key, value in encoder.items():
        if key not in target or target[key].shape != value.shape:
            raise CheckpointError(f"encoder tensor {key!r} {tuple(value.shape)} does not fit nnU-Net's Primus")
    missing = [k for k in target if k.startswith(("down_projection.", "eva.")) and k not in encoder]
    if missing:
        raise CheckpointError(f"the checkpoint lacks encoder tensor {missing[0]!r} ({len(missing)} missing)")
    net.load_state_dict(encoder, strict=False)
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in net.state_dict().items()}, resampled


def resample_positions(table: torch.Tensor, grid: int, patch_size: tuple[int, int, int], patch: int) -> torch.Tensor:
    """EVA's absolute table (1, g³, D) on the pretraining grid -> (1, L', D) on ``patch_size``'s grid, trilinearly
    (the rotary encoding needs nothing: nnU-Net computes it for its own grid, in the same token units)."""
    dim = table.shape[-1]
    cube = table.reshape(1, grid, grid, grid, dim).permute(0, 4, 1, 2, 3)  # (1, D, gz, gy, gx), nnU-Net's order
    out = F.interpolate(cube, size=tuple(s // patch for s in patch_size), mode="trilinear", align_corners=False)
    return out.flatten(2).transpose(1, 2).contiguous()  # (1, D, z, y, x) -> (1, L', D)


def plans_fragment(cfg: RunConfig, patch_size: tuple[int, int, int]) -> dict[str, Any]:
    """The nnU-Net plans entries under which its preprocessing gives what the encoder learned from.

    CTNormalization clips to ``percentile_00_5``..``percentile_99_5`` and subtracts ``mean``, divides by ``std``; with
    the HU window's ends as the percentiles, its lower end as mean and its width as std it computes ctmae's
    ``(clip(HU, lo, hi) - lo) / (hi - lo)`` exactly. The spacing is ctmae's, in nnU-Net's (Z, Y, X) order; no axis is
    transposed; the reader reorients to RAS, so the arrays are ctmae's with the axes reversed, the order the encoder
    works in (``ctmae.mae.primus``).
    """
    lo, hi = (float(v) for v in cfg.preprocess.hu_window)
    return {
        "image_reader_writer": READER,
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "foreground_intensity_properties_per_channel": {
            "0": {
                "mean": lo,
                "std": hi - lo,
                "percentile_00_5": lo,
                "percentile_99_5": hi,
                "min": lo,
                "max": hi,
                "median": (lo + hi) / 2,
            }
        },
        "configurations": {
            "3d_fullres": {
                "patch_size": list(patch_size),
                "spacing": [float(s) for s in reversed(cfg.preprocess.spacing)],
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
            }
        },
    }


def apply_plans(plans_file: str | os.PathLike, fragment_file: str | os.PathLike) -> dict[str, Any]:
    """Merge an export's ``plans_fragment.json`` into nnU-Net's plans file (rewritten in place); returns the plans."""
    plans = json.loads(Path(plans_file).read_text(encoding="utf-8"))
    fragment = json.loads(Path(fragment_file).read_text(encoding="utf-8"))
    plans.update({k: v for k, v in fragment.items() if k != "configurations"})
    for name, entries in fragment["configurations"].items():
        plans.setdefault("configurations", {}).setdefault(name, {}).update(entries)
    atomic_write_json(plans_file, plans)
    return plans


def describe_nnunet(
    checkpoint: str | os.PathLike, patch_size: tuple[int, int, int] | None, num_classes: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(config.json content, the network's tensors, the plans fragment) of a Primus MAE checkpoint.

    Args:
        checkpoint: a checkpoint of ``ctmae pretrain --arch primus``.
        patch_size: nnU-Net's patch size (its plans' order); None: the pretraining crop.
        num_classes: nnU-Net's output channels, background included.

    Raises:
        CheckpointError: not a Primus MAE checkpoint (a ViT one, a segmentation one, a foreign file).
        ValueError: fewer than 2 classes.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background too (nnU-Net's output channels): >= 2, got {num_classes}")
    path = Path(checkpoint)
    state = load_mae_state(path)
    cfg: RunConfig = state["config"]
    if cfg.model.arch != "primus":
        raise CheckpointError(
            f"{path}: a ViT encoder ({cfg.model.arch}); --format nnunet takes a checkpoint of ctmae pretrain --arch "
            f"primus (a ViT goes to MONAI: --format safetensors or monai-bundle)"
        )
    patch_size = patch_size or (cfg.preprocess.crop,) * 3
    weights, resampled = primus_weights(state["model"], cfg, patch_size, num_classes)
    training, figures = training_of(path, state)
    config = {
        "format": "ctmae-nnunet-primus",
        "network": "dynamic_network_architectures.architectures.primus.Primus",
        "trainer": TRAINERS.get(cfg.model.size),  # None for tiny: no nnU-Net trainer has its sizes
        "size": cfg.model.size,
        "patch_size": list(patch_size),
        "num_classes": num_classes,
        "pretraining_crop": [cfg.preprocess.crop] * 3,
        "position_table": "resampled trilinearly" if resampled else "as pretrained",
        "transferred": ["down_projection (8³ patch embedding)", "eva (blocks, norm, absolute position table)"],
        "not_transferred": ["up_projection (segmentation decoder: the trainer's own initialisation)", "mask_token"],
        "preprocessing": preprocessing_of(cfg.preprocess),
        "training": training,
        **({"evaluation": figures} if figures else {}),
        "ctmae_config": cfg.to_dict(),
        "weights": {"file": WEIGHTS, "tensors": len(weights), "sha256": tensors_sha256(weights)},
    }
    return config, weights, plans_fragment(cfg, patch_size)


def write_nnunet(
    out: Path, config: dict[str, Any], weights: dict[str, torch.Tensor], fragment: dict[str, Any]
) -> list[Path]:
    """Write ``out``/{pretrained_weights.pth, plans_fragment.json, config.json, README.md} (``out`` exists)."""
    from ctmae.share.nnunet_card import nnunet_card

    with atomic_path(out / WEIGHTS) as tmp:
        torch.save({"network_weights": weights, "ctmae": {"format": config["format"], "size": config["size"]}}, tmp)
    atomic_write_json(out / PLANS, fragment)
    atomic_write_json(out / CONFIG, config)
    atomic_write_text(out / CARD, nnunet_card(config))
    return [out / WEIGHTS, out / PLANS, out / CONFIG, out / CARD]
