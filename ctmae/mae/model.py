"""The patch-decoded 3D masked autoencoder: a ViT encoder over visible patches and a light decoder.

Stages follow MAE: patchify -> encode visible tokens -> decode -> predict the voxels of the tokens in ``ids_pred``
only -> MSE on those tokens. The decoder is CrossMAE's (Fu et al., "Rethinking Patch Dependence for Masked
Autoencoders", 2024): one query per predicted token (mask token + position) cross-attends to the visible tokens, and
queries never attend to each other, so its cost grows with the predicted tokens only and any subset of them gives
exactly the subset of the full prediction. Encoder parameter names mirror MONAI's ``ViT``
(``patch_embedding.patch_embeddings``, ``patch_embedding.position_embeddings``, ``blocks.N.{norm1,attn.qkv,
attn.out_proj,norm2,mlp.linear1,mlp.linear2}``, ``norm``), so ``encoder.state_dict()`` loads into ``monai.networks.
nets.ViT`` / the ``vit`` of ``UNETR`` built with the same sizes (only MONAI's unused ``norm_cross_attn`` is absent).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

import torch
import torch.nn.functional as F
from torch import nn

from ctmae.mae.blocks import Block, CrossBlock, sincos_embedding_3d
from ctmae.mae.config import ModelConfig
from ctmae.mae.fill_context import (
    QUERY_SIGMAS,
    FillQueries,
    fill_maps,
    from_patches,
    pool_factor,
    to_voxels,
    visible_voxels,
)
from ctmae.mae.masking import TokenMask


class PatchEmbedding(nn.Module):
    """Linear patch embedding stored as MONAI's Conv3d, applied to already-gathered patch vectors."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.patch_embeddings = nn.Conv3d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch, stride=cfg.patch)
        self.register_buffer("position_embeddings", sincos_embedding_3d(cfg.grid, cfg.dim))

    def forward(self, patches: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, Lv, C·p³) patches at token positions ``ids`` (B, Lv) -> (B, Lv, D)."""
        weight = self.patch_embeddings.weight.flatten(1)  # (D, C, p, p, p) -> (D, C·p³), patchify's order
        x = F.linear(patches, weight, self.patch_embeddings.bias)
        return x + self.position_embeddings[0][ids]


class ViTEncoder(nn.Module):
    """3D ViT encoding any subset of a crop's tokens from patch vectors; no head: the features are the output."""

    init_by_mae = True  # MaskedAutoencoder3D initialises its weights (MAE's recipe)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = PatchEmbedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.qkv_bias) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward_features(self, patches: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Encode patches (B, L, C·p³); with ``ids`` (B, Lv) only those tokens. Returns (B, Lv, D)."""
        if ids is None:
            ids = torch.arange(patches.shape[1], device=patches.device).expand(patches.shape[0], -1)
        else:
            patches = torch.gather(patches, 1, ids[..., None].expand(-1, -1, patches.shape[-1]))  # (B, Lv, C·p³)
        x = self.patch_embedding(patches, ids)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    forward = forward_features


class UpsamplingHead(nn.Module):
    """Voxels of a patch from its decoder token through two stride-2 transposed convolutions, instead of one linear
    map: a linear layer gives every patch's p³ voxels from a ``dec_dim``-wide token, so they span at most
    ``dec_dim`` fixed patterns; here a coarse (p/4)³ grid of features is upsampled with a nonlinearity between."""

    def __init__(self, cfg: ModelConfig, width: int = 32) -> None:
        super().__init__()
        if cfg.patch % 4:
            raise ValueError(f"the upsample head needs a patch size divisible by 4, got {cfg.patch}")
        self.coarse, self.width = cfg.patch // 4, width
        self.linear = nn.Linear(cfg.dec_dim, width * self.coarse**3)
        self.up1 = nn.ConvTranspose3d(width, width // 2, kernel_size=2, stride=2)
        self.up2 = nn.ConvTranspose3d(width // 2, cfg.in_chans, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, Dd) -> (B, N, C·p³), voxels in patchify's (C, pd, ph, pw) order."""
        b, n, _ = x.shape
        s = self.coarse
        grid = self.linear(x).reshape(b * n, self.width, s, s, s)  # (B·N, width, p/4, p/4, p/4)
        voxels = self.up2(F.gelu(self.up1(grid)))  # (B·N, C, p, p, p)
        return voxels.reshape(b, n, -1)


class Decoder(nn.Module):
    """CrossMAE decoder: a query per predicted token reads the visible tokens; the voxel head runs on the queries."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed = nn.Linear(cfg.dim, cfg.dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dec_dim))
        self.register_buffer("position_embeddings", sincos_embedding_3d(cfg.grid, cfg.dec_dim))
        self.blocks = nn.ModuleList(
            CrossBlock(cfg.dec_dim, cfg.dec_heads, cfg.mlp_ratio, cfg.qkv_bias) for _ in range(cfg.dec_depth)
        )
        self.norm = nn.LayerNorm(cfg.dec_dim)
        coarse = cfg.patch // pool_factor(cfg.patch)  # the smooth head's residual cells per patch edge
        heads = {
            "upsample": lambda: UpsamplingHead(cfg),
            "smooth": lambda: nn.Linear(cfg.dec_dim, cfg.in_chans * coarse**3),
            "linear": lambda: nn.Linear(cfg.dec_dim, cfg.in_chans * cfg.patch**3),
        }
        self.head = heads[cfg.head]()

    def forward(
        self, latent: torch.Tensor, ids_keep: torch.Tensor, ids_pred: torch.Tensor, queries: torch.Tensor | None = None
    ) -> torch.Tensor:
        """latent (B, Lv, D) at tokens ``ids_keep`` (B, Lv) -> voxel predictions (B, Lp, C·p³) at ``ids_pred``;
        ``queries`` (B, Lp, Dd), when given, is added to the predicted tokens' queries."""
        pos = self.position_embeddings[0]  # (L, Dd)
        context = self.embed(latent) + pos[ids_keep]  # (B, Lv, Dd)
        x = self.mask_token + pos[ids_pred]  # (B, Lp, Dd)
        if queries is not None:
            x = x + queries
        for blk in self.blocks:
            x = blk(x, context)
        return self.head(self.norm(x))


class MaskedAutoencoder3D(nn.Module):
    """Patch-decoded 3D MAE; ``forward`` returns ``(loss, pred, mask)`` like MAE's reference.

    Inference goes through ``encode`` (token features) and ``reconstruct`` (voxel predictions); callers outside the
    model need neither ``encoder``/``decoder`` nor ``patchify``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = self.build_encoder(cfg)
        self.decoder = Decoder(cfg)
        self.fill_queries = FillQueries(cfg) if cfg.fill_queries else None
        for part in self.children():  # an encoder from another library (Primus) keeps that library's own init
            if part is not self.encoder or self.encoder.init_by_mae:
                part.apply(_init_weights)
        nn.init.normal_(self.decoder.mask_token, std=0.02)
        if self.encoder.init_by_mae:
            w = self.encoder.patch_embedding.patch_embeddings.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer over flattened patches (MAE)
        if cfg.fill_sigma:  # a residual over the fill starts at zero: the untrained model is the fill
            last = self.decoder.head.up2 if cfg.head == "upsample" else self.decoder.head
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def build_encoder(self, cfg: ModelConfig) -> nn.Module:
        """The encoder: (B, L, C·p³) patches and optional ``ids`` (B, Lv) -> (B, Lv, D) features."""
        return ViTEncoder(cfg)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, L, C·p³); tokens in raster order, voxels as (C, pd, ph, pw) like Conv3d weights."""
        b, c, d, h, w = images.shape
        p = self.cfg.patch
        x = images.reshape(b, c, d // p, p, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, (d // p) * (h // p) * (w // p), c * p**3)

    def unpatchify(self, patches: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, L, C·p³) -> (B, C, D, H, W), the inverse of ``patchify``."""
        b, p, c = patches.shape[0], self.cfg.patch, self.cfg.in_chans
        x = patches.reshape(b, *grid, c, p, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, gd, p, gh, p, gw, p)
        return x.reshape(b, c, grid[0] * p, grid[1] * p, grid[2] * p)

    def grid(self, images: torch.Tensor) -> tuple[int, int, int]:
        p = self.cfg.patch
        shape = tuple(images.shape[2:])
        if shape != (self.cfg.img_size,) * 3:
            raise ValueError(f"model expects {self.cfg.img_size}³ crops, got {shape}")
        return shape[0] // p, shape[1] // p, shape[2] // p

    def targets(self, patches: torch.Tensor, ids_pred: torch.Tensor) -> torch.Tensor:
        """Target voxels of the predicted tokens from patchified images (B, L, C·p³), per-patch normalised if
        configured: (B, Lp, C·p³)."""
        target = torch.gather(patches, 1, ids_pred[..., None].expand(-1, -1, patches.shape[-1]))
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward(
        self,
        images: torch.Tensor,
        mask: TokenMask,
        inputs: torch.Tensor | None = None,
        maps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masked reconstruction loss.

        Args:
            images: clean crops (B, C, D, H, W), the reconstruction targets.
            mask: visible and predicted tokens (see ``ctmae.mae.masking``).
            inputs: what the encoder reads (e.g. noise-corrupted images); defaults to ``images``.
            maps: the crops' fills from the scan around them (``decode``); default from the crops alone.

        Returns:
            loss (scalar, MSE over predicted tokens), pred (B, Lp, C·p³), mask (B, L).
        """
        self.grid(images)
        patches = self.patchify(images)  # (B, L, C·p³), patchified once for the encoder input and the targets
        encoder_in = patches if inputs is None else self.patchify(inputs)
        latent = self.encoder(encoder_in, mask.ids_keep)
        pred = self.decode(latent, images if inputs is None else inputs, mask.ids_keep, mask.ids_pred, maps=maps)
        loss = F.mse_loss(pred.float(), self.targets(patches, mask.ids_pred).float())
        return loss, pred, mask.mask

    def decode(
        self,
        latent: torch.Tensor,
        images: torch.Tensor,
        ids_keep: torch.Tensor,
        ids_pred: torch.Tensor,
        known: torch.Tensor | None = None,
        maps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Voxels (B, Lp, C·p³) at the ``ids_pred`` tokens from the encoder's ``latent`` at ``ids_keep``: the
        decoder's output, added to a gaussian fill of the encoder's input ``images`` when ``fill_sigma`` is set (its
        queries reading the fills around them when ``fill_queries`` is, ``ctmae.mae.fill_context``). ``known`` (B, 1,
        D, H, W) 0/1 marks the voxels that belong to the scan: padding beyond its edge never enters a fill. ``maps``
        (``fill_context_maps``' output for these crops, computed over a larger region, e.g. a whole scan) replaces
        the fills of the crops alone."""
        if not self.cfg.fill_sigma:
            return self.decoder(latent, ids_keep, ids_pred)
        p = self.cfg.patch
        if maps is None:
            visible = visible_voxels(ids_keep, self.grid(images), p, images)  # (B, 1, D, H, W) 0/1
            maps = self.fill_context_maps(images, visible if known is None else visible * known)
        queries = (
            None if self.fill_queries is None else self.fill_queries(maps[:, : 2 * len(QUERY_SIGMAS)], ids_pred, p)
        )
        i = 2 * self.fill_sigmas.index(self.cfg.fill_sigma)
        fill = self._at(to_voxels(maps[:, i : i + 1], p).expand(-1, images.shape[1], -1, -1, -1), ids_pred)
        residual = self.decoder(latent, ids_keep, ids_pred, queries)
        return fill + (self._smooth(residual, ids_keep, ids_pred, images) if self.cfg.head == "smooth" else residual)

    @property
    def fill_sigmas(self) -> tuple[float, ...]:
        """The fill widths (voxels) the decoder reads: ``QUERY_SIGMAS`` with ``fill_queries``, and ``fill_sigma``."""
        sigmas = QUERY_SIGMAS if self.fill_queries is not None else ()
        return sigmas if self.cfg.fill_sigma in sigmas else (*sigmas, self.cfg.fill_sigma)

    def fill_context_maps(
        self, images: torch.Tensor, visible: torch.Tensor, sums: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The fills ``decode`` adds to and reads, of ``images`` (B, C, D, H, W) from the ``visible`` voxels (B, 1,
        D, H, W): (B, 2S, D/f, H/f, W/f), [fill, support] per width in ``fill_sigmas`` on ``fill_maps``' coarse grid.
        Over a whole scan, a crop of these (at multiples of the patch) is what ``decode`` takes as ``maps``; with the
        scan's ``sums`` (``fill_maps``), over a part of it reaching ``fill_reach`` beyond the crop, the same."""
        return fill_maps(images, visible, self.fill_sigmas, self.cfg.patch, sums)

    def _smooth(
        self, residual: torch.Tensor, ids_keep: torch.Tensor, ids_pred: torch.Tensor, images: torch.Tensor
    ) -> torch.Tensor:
        """The ``smooth`` head's coarse residuals (B, Lp, C·q³) as one field over the crop (0 on visible tokens),
        interpolated trilinearly across patch borders: voxels (B, Lp, C·p³) at ``ids_pred``."""
        grid, b, width = self.grid(images), residual.shape[0], residual.shape[-1]
        coarse = residual.new_zeros(b, grid[0] * grid[1] * grid[2], width)
        coarse = coarse.scatter(1, ids_pred[..., None].expand(-1, -1, width), residual)
        coarse = coarse.scatter(1, ids_keep[..., None].expand(-1, -1, width), 0.0)  # (B, L, C·q³)
        return self._at(to_voxels(from_patches(coarse, grid, self.cfg.in_chans), self.cfg.patch), ids_pred)

    def _at(self, field: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The voxels (B, Lp, C·p³) of a crop-sized ``field`` (B, C, D, H, W) at the tokens ``ids`` (B, Lp)."""
        voxels = self.patchify(field)  # (B, L, C·p³)
        return torch.gather(voxels, 1, ids[..., None].expand(-1, -1, voxels.shape[-1]))

    def encode(self, images: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder features of crops (B, C, D, H, W): every token, or those in ``ids_keep`` (B, Lv). (B, Lv, D)."""
        self.grid(images)
        return self.encoder(self.patchify(images), ids_keep)

    def reconstruct(
        self,
        images: torch.Tensor,
        ids_keep: torch.Tensor | None = None,
        ids_pred: torch.Tensor | None = None,
        known: torch.Tensor | None = None,
        maps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The decoder's voxels for crops (B, C, D, H, W), which are what the encoder reads (e.g. noise-corrupted).

        Args:
            images: the encoder's input crops.
            ids_keep: (B, Lv) tokens the encoder sees; default every token.
            ids_pred: (B, Lp) tokens to predict; default every token.
            known: (B, 1, D, H, W) 0/1, the voxels of the scan (0 where a crop is padded beyond its edge); default all.
            maps: the crops' fills from a larger region (``decode``); default from the crops alone.

        Returns:
            (B, C, D, H, W): predicted voxels at the ``ids_pred`` tokens, 0 elsewhere. Predictions of a subset equal
            the same tokens of the full prediction (the decoder's queries do not attend to each other).
        """
        grid = self.grid(images)
        every = torch.arange(grid[0] * grid[1] * grid[2], device=images.device).expand(images.shape[0], -1)  # (B, L)
        ids_keep = every if ids_keep is None else ids_keep
        ids_pred = every if ids_pred is None else ids_pred
        pred = self.decode(self.encode(images, ids_keep), images, ids_keep, ids_pred, known, maps)
        if ids_pred is not every:  # (B, Lp, C·p³) -> (B, L, C·p³), zeros at the tokens not predicted
            index = ids_pred[..., None].expand(-1, -1, pred.shape[2])
            pred = pred.new_zeros(*every.shape, pred.shape[2]).scatter(1, index, pred)
        return self.unpatchify(pred, grid)


# Architectures by ``ModelConfig.arch``, each a function giving its class (which takes a ModelConfig): a new one is
# one entry. Primus is imported when built: it subclasses the MAE above and needs the nnunet extra.
ARCHITECTURES: dict[str, Callable[[], type[MaskedAutoencoder3D]]] = {
    "mae3d": lambda: MaskedAutoencoder3D,
    "primus": lambda: import_module("ctmae.mae.primus").PrimusMAE,
}


def build_model(cfg: ModelConfig) -> MaskedAutoencoder3D:
    """The model ``cfg`` describes; every caller (training, checkpoints, inference) builds models here."""
    if cfg.arch not in ARCHITECTURES:
        raise ValueError(f"unknown model arch {cfg.arch!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[cfg.arch]()(cfg)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
