"""ctmae: masked autoencoder pretraining for CT volumes.

The Python API under the commands (docs/python-api.md): ``ctmae.pretrain``, ``ctmae.finetune`` (with
``ctmae.finetune_config``), ``ctmae.segment``, ``ctmae.reconstruct`` and ``ctmae.embed`` write what their commands
write and return a result (``Pretraining``, ``Finetuning``, ``Segmentation``, ``Reconstruction``, ``Embedding``); they
print nothing, tell a ``ctmae.Reporter`` their progress, and raise ``ctmae.OptionError`` for arguments that cannot work.
``ctmae.load_encoder`` and ``ctmae.load_unetr`` hand a pretrained encoder (an export folder or an MAE checkpoint) to
MONAI's ``ViT`` / ``UNETR``; they import torch and MONAI only when called, so ``import ctmae`` stays cheap.
``ctmae.PretrainConfig`` (with ``PretrainConfig.recipe("demo")``) and ``ctmae.FinetuneConfig`` are the run configs,
``ctmae.PreprocessConfig`` their shared preprocessing section; each is imported on first use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from monai.networks.nets import UNETR, ViT

__version__ = "0.1.0"
# public name -> (module, attribute), imported on first use (PEP 562)
_LAZY = {
    "PretrainConfig": ("ctmae.mae.config", "RunConfig"),
    "FinetuneConfig": ("ctmae.seg.config", "SegConfig"),
    "PreprocessConfig": ("ctmae.preprocess.config", "PreprocessConfig"),
    "pretrain": ("ctmae.api.pretrain", "pretrain"),
    "Pretraining": ("ctmae.api.pretrain", "Pretraining"),
    "finetune": ("ctmae.api.finetune", "finetune"),
    "finetune_config": ("ctmae.api.finetune", "finetune_config"),
    "Finetuning": ("ctmae.api.finetune", "Finetuning"),
    "segment": ("ctmae.api.segment", "segment"),
    "Segmentation": ("ctmae.api.segment", "Segmentation"),
    "reconstruct": ("ctmae.api.reconstruct", "reconstruct"),
    "Reconstruction": ("ctmae.api.reconstruct", "Reconstruction"),
    "embed": ("ctmae.api.embed", "embed"),
    "Embedding": ("ctmae.api.embed", "Embedding"),
    "Reporter": ("ctmae.api.common", "Reporter"),
    "OptionError": ("ctmae.api.common", "OptionError"),
}
__all__ = ["__version__", "load_encoder", "load_unetr", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'ctmae' has no attribute {name!r}")
    import importlib

    module, attribute = _LAZY[name]
    return getattr(importlib.import_module(module), attribute)


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu", img_size: int | None = None) -> ViT:
    """MONAI's ``ViT`` with a ctmae encoder's weights, in eval mode on ``device``.

    Args:
        path: an export folder (``ctmae export``: safetensors or MONAI bundle) or an MAE checkpoint (``.pt``).
        device: where the network goes.
        img_size: crop edge to build the ViT for; default the training crop (the fixed sin-cos position table is
            recomputed exactly for another size).

    Raises:
        ctmae.runtime.checkpoint.CheckpointError: not a ctmae encoder, or weights that do not match their config.
    """
    from ctmae.share.load import load_encoder as load

    return load(path, device, img_size)


def load_unetr(path: str | os.PathLike, num_classes: int, feature_size: int = 16, img_size: int | None = None) -> UNETR:
    """MONAI's ``UNETR`` whose ViT holds a ctmae encoder (the decoder is randomly initialised), ready to fine-tune.

    Args:
        path: an export folder or an MAE checkpoint; the encoder needs 16³ patches and 12 blocks.
        num_classes: output channels, background included.
        feature_size: UNETR's convolutional width.
        img_size: crop edge, a multiple of 16; default the training crop.

    Raises:
        ValueError: an encoder UNETR cannot hold. CheckpointError: as ``load_encoder``.
    """
    from ctmae.share.load import load_unetr as load

    return load(path, num_classes, feature_size, img_size)
