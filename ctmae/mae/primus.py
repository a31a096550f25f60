"""nnU-Net's Primus transformer as the MAE's encoder (``--arch primus``), so its weights load into
``nnUNetv2_train -tr nnUNet_Primus_{S,B,M,L}_Trainer -pretrained_weights``.

The encoder *is* a ``dynamic_network_architectures`` ``Primus``, built with the arguments of nnU-Net's Primus trainers
(8³ patch embedding, EVA blocks with rotary and absolute position encoding, ``scale_attn_inner``, layer scale 0.1):
ctmae keeps its ``down_projection`` and ``eva`` and drops the segmentation decoder (``up_projection``), which ctmae's
CrossMAE decoder replaces during pretraining. Only the visible tokens enter the EVA blocks, each with its own rows of
the absolute table and of the rotary table, exactly as EVA's own patch dropout does. Pretraining uses no stochastic
depth (MAE's recipe); nnU-Net's fine-tuning adds its 0.2, which has no weights.

Axis order: ctmae's crops are (X, Y, Z) in RAS; nnU-Net's arrays, read with ``NibabelIOWithReorient``, are the same
voxels as (Z, Y, X). The encoder works in nnU-Net's order (each patch's voxels and each token's position are mapped
on the way in), so the patch-embedding kernel, the absolute position table and the rotary axes transfer as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ctmae.mae.config import ModelConfig
from ctmae.mae.model import MaskedAutoencoder3D

EXTRA_HINT = "pip install 'ctmae[nnunet]'"
PRETRAIN_DROP_PATH = 0.0  # MAE pretrains without stochastic depth; nnU-Net's trainers fine-tune with 0.2


def missing_extra(model: ModelConfig) -> str | None:
    """Why ``model`` cannot be built here (Primus without a working nnU-Net network library), or None."""
    if model.arch != "primus":
        return None
    try:
        import dynamic_network_architectures.architectures.primus  # noqa: F401
    except ImportError:
        return f"--arch primus needs nnU-Net's network library dynamic-network-architectures: {EXTRA_HINT}"
    except Exception as e:  # installed, but a dependency fails to load (e.g. a torchvision built for another torch)
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"--arch primus: nnU-Net's network library is installed but does not import here ({why})"
    return None


def primus_network(model: ModelConfig, shape: tuple[int, int, int], num_classes: int, drop_path: float) -> nn.Module:
    """A ``Primus`` network as nnU-Net's Primus trainers build it, for inputs of ``shape`` (nnU-Net's axis order)."""
    problem = missing_extra(model)
    if problem:
        raise ValueError(problem)
    from dynamic_network_architectures.architectures.primus import Primus

    return Primus(
        model.in_chans,
        model.dim,
        (model.patch,) * 3,
        num_classes,
        model.depth,
        model.heads,
        shape,
        mlp_ratio=model.mlp_ratio,
        drop_path_rate=drop_path,
        scale_attn_inner=True,
        init_values=0.1,
    )


def to_nnunet_ids(ids: torch.Tensor, grid: int) -> torch.Tensor:
    """Token indices of ctmae's (X, Y, Z) raster order -> the same tokens in nnU-Net's (Z, Y, X) raster order."""
    i, j, k = ids // grid**2, ids // grid % grid, ids % grid
    return (k * grid + j) * grid + i


class PrimusEncoder(nn.Module):
    """Primus's patch embedding and EVA encoder over any subset of a crop's tokens; keys as in nnU-Net's network."""

    init_by_mae = False  # dynamic_network_architectures initialises Primus (He for the patch embedding, EVA's own)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        net = primus_network(cfg, (cfg.img_size,) * 3, 1, PRETRAIN_DROP_PATH)
        self.down_projection = net.down_projection  # PatchEmbed: Conv3d(C, D, 8, stride 8)
        self.eva = net.eva

    def forward(self, patches: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Encode patches (B, L, C·p³) of ctmae's ``patchify``; with ``ids`` (B, Lv) only those tokens. (B, Lv, D)."""
        b, p, c = patches.shape[0], self.cfg.patch, self.cfg.in_chans
        if ids is None:
            ids = torch.arange(patches.shape[1], device=patches.device).expand(b, -1)
        else:
            patches = torch.gather(patches, 1, ids[..., None].expand(-1, -1, patches.shape[-1]))  # (B, Lv, C·p³)
        voxels = patches.reshape(b, -1, c, p, p, p).permute(0, 1, 2, 5, 4, 3).reshape(b, ids.shape[1], c * p**3)
        # (B, Lv, C·px·py·pz) -> (B, Lv, C·pz·py·px): the flattened order of the Conv3d kernel in nnU-Net's axes
        proj = self.down_projection.proj
        x = F.linear(voxels, proj.weight.flatten(1), proj.bias)  # the Conv3d on whole patches, visible ones only
        at = to_nnunet_ids(ids, self.cfg.grid)  # (B, Lv)
        x = self.eva.pos_drop(x + self.eva.pos_embed[0][at])
        if x.shape[1] == 0:  # a window whose tokens are all hidden (reconstruct): EVA cannot reshape zero tokens
            return x  # (B, 0, D)
        rope = None if self.eva.rope is None else self.eva.rope.get_embed()[at].unsqueeze(1)  # (B, 1, Lv, 2·r)
        for blk in self.eva.blocks:
            x = blk(x, rope=rope)
        return self.eva.norm(x)


class PrimusMAE(MaskedAutoencoder3D):
    """ctmae's masked autoencoder (masking, CrossMAE decoder, loss) around nnU-Net's Primus encoder."""

    def build_encoder(self, cfg: ModelConfig) -> nn.Module:
        return PrimusEncoder(cfg)
