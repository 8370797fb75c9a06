"""GroupViT / PGSeg image encoder: patch embedding, grouping stages, final LayerNorm."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ovseg.pipeline.patches import resample_pos_embed

from .grouping import GroupingStage


@dataclass
class VisionOutput:
    """What segmentation needs from one forward pass.

    `tokens` (B, G, C): the final group tokens after the last LayerNorm; `assignment` (B, N, G):
    soft patch-to-group assignment chained over the grouping stages (rows sum to one);
    `grid` (h, w): the patch grid of the N patches.
    """

    tokens: torch.Tensor
    assignment: torch.Tensor
    grid: tuple[int, int]


class PatchEmbed(nn.Module):
    """Non-overlapping patches (a strided convolution), then LayerNorm: (B, 3, H, W) -> (B, N, C), grid."""

    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(images)
        return self.norm(x.flatten(2).transpose(1, 2)), (x.shape[-2], x.shape[-1])


class GroupViTVisionEncoder(nn.Module):
    """Stages of transformer blocks with learned group tokens; `npr_hidden_dim` enables PGSeg's NPR."""

    def __init__(
        self,
        *,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depths: tuple[int, ...],
        num_heads: tuple[int, ...],
        num_group_tokens: tuple[int, ...],
        num_output_groups: tuple[int, ...],
        mlp_ratio: float,
        npr_hidden_dim: int | None,
        npr_iters: int,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.stages = nn.ModuleList(
            GroupingStage(
                embed_dim,
                depths[i],
                num_heads[i],
                mlp_ratio,
                num_group_tokens[i],
                num_output_groups[i] if i < len(num_output_groups) else None,
                num_group_tokens[i - 1] if i > 0 else None,
                npr_hidden_dim,
                npr_iters,
            )
            for i in range(len(depths))
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, images: torch.Tensor) -> VisionOutput:
        """`images`: normalised (B, 3, H, W) with H and W multiples of the patch size."""
        x, grid = self.patch_embed(images)
        side = math.isqrt(self.pos_embed.shape[1])  # GroupViT's table is square, without a class position
        x = x + resample_pos_embed(self.pos_embed, (side, side), tuple(grid), "size", prefix=0)
        group_tokens = None
        assignment = None
        for stage in self.stages:
            x, group_tokens, soft = stage(x, group_tokens)
            if soft is not None:
                step = soft.transpose(1, 2)  # (B, N_in, G)
                assignment = step if assignment is None else assignment @ step
        if assignment is None:
            raise ValueError("the image encoder has no grouping stage")
        return VisionOutput(self.norm(x), assignment, grid)
