"""Independent computations, written from the formulas, for the ProxyCLIP and CASS tests.

Tiny random models (ovseg's 2-layer CLIP, a 2-block width-64 DINO ViT/8) and the forward passes of both methods
written out with plain torch ops on the models' own weights: the CLIP trunk, the DINO trunk in DINO's operation
order, ProxyCLIP's proxy attention and CASS's spectral distillation with a per-head loop.
"""

from __future__ import annotations

import math
import numpy as np
import torch
import torch.nn.functional as F

# the authors' OpenAI blocks are seq-first, so nn.MultiheadAttention takes its standard (not its fused) path
from ovseg_vfm.common import standard_mha as standard_attention_path

MMSEG_MEAN = torch.tensor([122.771, 116.746, 104.094]).view(1, 3, 1, 1)
MMSEG_STD = torch.tensor([68.501, 66.632, 70.323]).view(1, 3, 1, 1)
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
TINY_VFM = dict(name="dino", model="vit_base_patch8_224", pretrained="random",
                model_kwargs=dict(embed_dim=64, depth=2, num_heads=2))


def images(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    """8-bit images (B, 3, H, W) / 255: smooth colour fields with a few flat rectangles, as real crops have."""
    g = torch.Generator().manual_seed(seed)
    out = F.interpolate(torch.rand(b, 3, 4, 5, generator=g), size=(h, w), mode="bicubic", align_corners=False)
    for i in range(b):
        for _ in range(3):
            y, x = int(torch.randint(0, h // 2, (1,), generator=g)), int(torch.randint(0, w // 2, (1,), generator=g))
            out[i, :, y : y + h // 3, x : x + w // 3] = torch.rand(3, 1, 1, generator=g)
    return (out.clamp(0, 1) * 255).round() / 255


def mmseg_input(windows: torch.Tensor, constants: str = "mmseg") -> torch.Tensor:
    """CLIP input: mmseg's rounded 0-255 statistics on the 8-bit values, or the exact [0, 1] ones."""
    if constants == "mmseg":
        return (windows * 255 - MMSEG_MEAN) / MMSEG_STD
    return (windows - CLIP_MEAN) / CLIP_STD


def dino_pos(table: torch.Tensor, grid: tuple[int, int], mode: str = "dino") -> torch.Tensor:
    """(1 + n0², C) positional table (class first) for a grid: DINO's bicubic with scale (g + 0.1) / n0, or
    bicubic to the exact size ("size")."""
    n0 = int(math.sqrt(table.shape[0] - 1))
    if grid == (n0, n0):
        return table
    patch = table[1:].reshape(1, n0, n0, -1).permute(0, 3, 1, 2)
    if mode == "dino":
        patch = F.interpolate(patch, scale_factor=((grid[0] + 0.1) / n0, (grid[1] + 0.1) / n0), mode="bicubic",
                              align_corners=False)
    else:
        patch = F.interpolate(patch, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([table[:1], patch.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])


def clip_trunk(visual, x: torch.Tensor, pos: str = "dino") -> tuple[torch.Tensor, tuple[int, int]]:
    """Tokens (B, 1 + h·w, D) entering CLIP's last block: conv (stride p drops a remainder), class token,
    positional embedding, ln_pre, the other blocks as they are."""
    t = visual.conv1(x)
    grid = tuple(t.shape[-2:])
    t = t.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.view(1, 1, -1).expand(t.shape[0], -1, -1)
    t = torch.cat([cls, t], dim=1) + dino_pos(visual.positional_embedding, grid, pos)
    t = visual.ln_pre(t)
    with standard_attention_path():
        for blk in visual.transformer.resblocks[:-1]:
            t = blk(t)
    return t, grid


def clip_head(visual, tokens: torch.Tensor) -> torch.Tensor:
    """ln_post, proj, L2 normalisation."""
    return F.normalize(visual.ln_post(tokens) @ visual.proj, dim=-1)


def dino_forward(vit, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO with attention `softmax((q kᵀ) · scale) v`: (last block's output after the final norm, the last block's
    qkv of its normed input), prefix token kept, for ImageNet-normalised z (a multiple of the patch)."""
    p = vit.patch_embed.proj.kernel_size[0]
    grid = (z.shape[-2] // p, z.shape[-1] // p)
    t = vit.patch_embed.proj(z).flatten(2).transpose(1, 2)
    t = torch.cat([vit.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + dino_pos(vit.pos_embed[0], grid)[None]
    qkv = None
    for blk in vit.blocks:
        h = blk.norm1(t)
        b, n, c = h.shape
        heads = blk.attn.num_heads
        qkv = blk.attn.qkv(h)
        q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1)
        t = t + blk.attn.proj((a @ v).transpose(1, 2).reshape(b, n, c))
        t = t + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(t))))
    return vit.norm(t), qkv


def lsa(cost: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment(cost)[1]
