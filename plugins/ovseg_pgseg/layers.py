"""Transformer building blocks shared by the GroupViT/PGSeg image encoder.

Written from the GroupViT paper (Xu et al., CVPR 2022) and the layer shapes of its released
checkpoints: leaf parameter names (`qkv`, `proj`, `fc1`, `linear_hidden.0`, ...) match the release so
that checkpoint conversion only renames containers (see `checkpoint.py`). Attention uses
`scaled_dot_product_attention` (default scale `head_dim ** -0.5`, as the release).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    """Linear - GELU - Linear over the last dimension."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MixerMlp(Mlp):
    """An `Mlp` over the token axis of (B, S, C): mixes S group tokens into `out_features` tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class ProjectMLP(nn.Module):
    """Conv1d(k=1) - BatchNorm - ReLU - Conv1d(k=1) over (B, L, C) or (B, C).

    The release trains these with SyncBatchNorm; at inference BatchNorm uses its running statistics,
    so the plain `BatchNorm1d` loads the same keys and computes the same function in eval mode.
    """

    def __init__(self, in_dim: int, inner_dim: int, out_dim: int):
        super().__init__()
        self.linear_hidden = nn.Sequential(
            nn.Conv1d(in_dim, inner_dim, kernel_size=1), nn.BatchNorm1d(inner_dim), nn.ReLU(inplace=True)
        )
        self.linear_out = nn.Conv1d(inner_dim, out_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeeze = x.ndim == 2
        if squeeze:
            x = x.unsqueeze(1)
        y = self.linear_out(self.linear_hidden(x.transpose(1, 2))).transpose(1, 2)
        return y.squeeze(1) if squeeze else y


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class CrossAttention(nn.Module):
    """Multi-head attention of `query` over `key` (the value is the key), separate projections."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        h = self.num_heads
        q, k, v = split_heads(self.q_proj(query), h), split_heads(self.k_proj(key), h), split_heads(self.v_proj(key), h)
        return self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class AttnBlock(nn.Module):
    """Pre-norm transformer block over image tokens concatenated with group tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossAttnBlock(nn.Module):
    """Group tokens attend to image tokens, then an MLP, then a post-norm (GroupViT's pre-assign step)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm_post = nn.LayerNorm(dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        x = query + self.attn(query, key)
        x = x + self.mlp(self.norm2(x))
        return self.norm_post(x)
