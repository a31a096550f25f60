"""The transformer blocks the MAE is built of, with MONAI's ViT parameter names (``ctmae.mae.model``): attention,
cross-attention, MLP, the encoder's and the decoder's blocks, and the fixed 3D sin-cos position embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sincos_embedding_3d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 3D sin-cos position embedding for a grid³ token cube, raster order; any ``dim``. Returns (1, L, dim)."""
    per_axis = (dim // 6) * 2  # sin + cos features per axis; remaining channels stay zero
    freqs = 1.0 / 10000 ** (torch.arange(per_axis // 2, dtype=torch.float64) / max(per_axis // 2, 1))
    coords = torch.stack(torch.meshgrid(*[torch.arange(grid, dtype=torch.float64)] * 3, indexing="ij"), -1)
    angles = coords.reshape(-1, 3, 1) * freqs  # (L, 3, per_axis/2)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1).reshape(grid**3, 3 * per_axis)  # (L, 3 * per_axis)
    return F.pad(emb, (0, dim - 3 * per_axis)).float()[None]


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection laid out as MONAI's SABlock, run by SDPA."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, N, hd)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))  # (B, N, D)


class CrossAttention(nn.Module):
    """Multi-head attention of queries over a separate set of tokens (keys and values), run by SDPA."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) queries, context (B, M, D) -> (B, N, D)."""
        (b, n, d), m, hd = x.shape, context.shape[1], x.shape[-1] // self.heads
        q = self.q(x).view(b, n, self.heads, hd).transpose(1, 2)  # (B, H, N, hd)
        kv = self.kv(context).view(b, m, 2, self.heads, hd).permute(2, 0, 3, 1, 4)  # (2, B, H, M, hd)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # (B, H, N, hd)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class Block(nn.Module):
    """Pre-norm transformer block, same computation and names as MONAI's TransformerBlock."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossBlock(nn.Module):
    """Pre-norm decoder block: queries cross-attend to the (separately normalised) context, then an MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), self.norm_context(context))
        return x + self.mlp(self.norm2(x))
