"""Grouping stages of GroupViT and PGSeg, inference only.

A stage runs transformer blocks over [image tokens, group tokens], then a grouping block assigns
every image token to one group token (hard assignment at inference) and returns one token per group.
PGSeg adds a non-parametric prototype module (NPR) per grouping stage: soft k-means between the
stage's input tokens and a stored prototype buffer, whose reconstruction (through an MLP) is added to
the image tokens before grouping. Training-only parts (Gumbel noise, prototype momentum updates,
matching losses) are left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import AttnBlock, CrossAttnBlock, MixerMlp, Mlp, ProjectMLP


class AssignAttention(nn.Module):
    """Single-head assignment of image tokens (keys) to group tokens (queries).

    Returns the grouped tokens and the soft assignment (B, G, N) (softmax over groups per token),
    which the segmentation decoding chains across stages. The tokens are pooled with the hard
    (arg-max) assignment, each group averaged with `assign_eps` added to its count, as the release.
    """

    def __init__(self, dim: int, assign_eps: float = 1.0):
        super().__init__()
        self.scale = dim**-0.5
        self.assign_eps = assign_eps
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, groups: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.q_proj(groups) @ self.k_proj(tokens).transpose(1, 2) * self.scale  # (B, G, N)
        soft = logits.softmax(dim=1)
        hard = F.one_hot(soft.argmax(dim=1), num_classes=groups.shape[1]).transpose(1, 2).to(soft.dtype)
        weights = hard / (hard.sum(dim=-1, keepdim=True) + self.assign_eps)
        return self.proj(weights @ self.v_proj(tokens)), soft


class GroupingBlock(nn.Module):
    """Merges N image tokens into `num_output_group` tokens guided by the stage's group tokens."""

    def __init__(self, dim: int, num_heads: int, num_group_token: int, num_output_group: int):
        super().__init__()
        self.norm_tokens = nn.LayerNorm(dim)
        self.mlp_inter = Mlp(num_group_token, dim // 2, num_output_group)
        self.norm_post_tokens = nn.LayerNorm(dim)
        self.norm_x = nn.LayerNorm(dim)
        self.pre_assign_attn = CrossAttnBlock(dim, num_heads)
        self.assign = AssignAttention(dim)
        self.norm_new_x = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, 4 * dim, dim)

    def forward(self, x: torch.Tensor, group_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norm_x(x)
        groups = self.mlp_inter(self.norm_tokens(group_tokens).transpose(1, 2)).transpose(1, 2)
        groups = self.pre_assign_attn(self.norm_post_tokens(groups), x)
        new_x, soft = self.assign(groups, x)
        new_x = new_x + groups
        return new_x + self.mlp_channels(self.norm_new_x(new_x)), soft


class PrototypeReconstruction(nn.Module):
    """PGSeg's NPR at inference: soft k-means against fixed prototypes, reconstruction through an MLP.

    `mu` (1, G, C) is a buffer of L2-normalised prototypes. Starting from it, `iters` rounds of
    assignment (softmax over prototypes, then normalised over tokens) and prototype update
    (weighted mean, L2-normalised) run per image; the tokens are rebuilt as `z @ mu` from the last
    round and mapped by `mapping_x`. The buffer itself never changes at inference.
    """

    def __init__(self, dim: int, num_prototypes: int, hidden_dim: int, iters: int = 10, eps: float = 1e-6):
        super().__init__()
        if iters < 1:
            raise ValueError(f"NPR needs at least one iteration, got {iters}")
        self.iters = iters
        self.eps = eps
        self.register_buffer("mu", F.normalize(torch.randn(1, num_prototypes, dim), dim=-1))
        self.mapping_x = ProjectMLP(dim, hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = self.mu.to(x.dtype).expand(x.shape[0], -1, -1)
        for _ in range(self.iters):
            z = (x @ mu.transpose(1, 2)).softmax(dim=-1)  # (B, N, G)
            z = z / (self.eps + z.sum(dim=1, keepdim=True))
            mu = z.transpose(1, 2) @ x
            mu = mu / (self.eps + mu.norm(dim=-1, keepdim=True))
        return self.mapping_x(z @ mu)


class GroupingStage(nn.Module):
    """One GroupViT stage: blocks over [tokens, group tokens], then (optionally) NPR and grouping.

    Returns the stage's output tokens, its group tokens after the blocks (the next stage projects
    them into its own group tokens) and the soft assignment (B, G, N) or None for the last stage.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        num_group_token: int,
        num_output_group: int | None,
        prev_group_token: int | None,
        npr_hidden_dim: int | None,
        npr_iters: int = 10,
    ):
        super().__init__()
        self.num_group_token = num_group_token
        self.group_token = nn.Parameter(torch.zeros(1, num_group_token, dim)) if num_group_token > 0 else None
        self.group_projector = None
        if num_group_token > 0 and prev_group_token:
            self.group_projector = nn.Sequential(nn.LayerNorm(dim), MixerMlp(prev_group_token, dim // 2, num_group_token))
        elif self.group_token is not None:
            # distinct random tokens (the release zero-initialises only tokens that get a projection)
            nn.init.trunc_normal_(self.group_token, std=0.02)
        self.blocks = nn.ModuleList(AttnBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.grouping = None
        self.prototypes = None
        if num_output_group:
            self.grouping = GroupingBlock(dim, num_heads, num_group_token, num_output_group)
            if npr_hidden_dim:
                self.prototypes = PrototypeReconstruction(dim, num_output_group, npr_hidden_dim, npr_iters)

    def forward(
        self, x: torch.Tensor, prev_group_tokens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        n = x.shape[1]
        group_tokens = None
        if self.group_token is not None:
            group_tokens = self.group_token.expand(x.shape[0], -1, -1)
            if self.group_projector is not None:
                group_tokens = group_tokens + self.group_projector(prev_group_tokens)
        h = x if group_tokens is None else torch.cat([x, group_tokens], dim=1)
        for blk in self.blocks:
            h = blk(h)
        out, group_tokens = h[:, :n], (h[:, n:] if group_tokens is not None else None)
        if self.grouping is None:
            return out, group_tokens, None
        if self.prototypes is not None:
            # PGSeg: the reconstruction of the stage's *input* tokens is added before grouping
            out = out + self.prototypes(x)
        out, soft = self.grouping(out, group_tokens)
        return out, group_tokens, soft
