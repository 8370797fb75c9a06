"""Images onto a ViT's patch grid: normalisation, the patch-grid policy, positional-embedding resampling.

Stages receive float images (B, 3, H, W) in [0, 1]. A window whose side is not a multiple of the patch
size is handled by a **grid policy**, each the one its authors' code uses:

- `pad`: zero-pad bottom/right (after normalisation) to a multiple of the patch; ceil grid. The grid is
  stretched over the window when windows are merged (LPOSS, CLIP-DINOiser, DINO).
- `floor`: drop the bottom/right remainder (a stride-p convolution does that by itself); floor grid,
  stretched over the whole window when merged (SCLIP, NACLIP, SC-CLIP, ResCLIP, CASS, FLOSS hosts).
- `center`: zero-pad evenly on both sides; the map is upsampled to the padded size and cropped back to
  the window, so the predictor returns it at pixel resolution (ClearCLIP's `compute_padsize`, ProxyCLIP).

All three agree whenever the window is a multiple of the patch (every standard protocol's windows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "GRID_POLICIES", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "GridLayout",
    "grid_layout", "grid_size", "prepare_images", "to_window", "resample_pos_embed",
]

GRID_POLICIES = ("pad", "floor", "center")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class GridLayout:
    """Where a window of `size` lands on the patch grid under a policy."""

    size: tuple[int, int]  # the window (H, W)
    patch: int  # patch side in pixels; for `center` the multiple padded to
    policy: str
    pad: tuple[int, int, int, int]  # zeros added (left, right, top, bottom)
    kept: tuple[int, int]  # pixels of the window the model sees (floor: the multiple below)

    @property
    def padded(self) -> tuple[int, int]:
        left, right, top, bottom = self.pad
        return self.kept[0] + top + bottom, self.kept[1] + left + right

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.padded
        return h // self.patch, w // self.patch


def grid_layout(height: int, width: int, patch: int, policy: str = "pad") -> GridLayout:
    if policy not in GRID_POLICIES:
        from ovseg.errors import ConfigError

        raise ConfigError(f"grid must be one of {', '.join(GRID_POLICIES)}, got {policy!r}")
    if policy == "floor":
        kept = (height // patch * patch, width // patch * patch)
        if min(kept) == 0:
            from ovseg.errors import ConfigError

            raise ConfigError(f"a {height}x{width} window is smaller than one {patch}-pixel patch (grid: floor)")
        return GridLayout((height, width), patch, policy, (0, 0, 0, 0), kept)
    dh, dw = -height % patch, -width % patch
    if policy == "pad":
        pad = (0, dw, 0, dh)
    else:
        pad = (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2)
    return GridLayout((height, width), patch, policy, pad, (height, width))


def grid_size(height: int, width: int, patch_size: int, policy: str = "pad") -> tuple[int, int]:
    """Patch grid of a window under a grid policy (`pad` and `center`: ceil, `floor`: floor)."""
    if policy == "floor":
        return height // patch_size, width // patch_size
    return math.ceil(height / patch_size), math.ceil(width / patch_size)


def prepare_images(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    patch_size: int,
    dtype: torch.dtype | None = None,
    grid: str = "pad",
) -> torch.Tensor:
    """Normalise (B, 3, H, W) images in [0, 1] and fit them to the patch grid under the policy `grid`.

    Padding happens after normalisation (zeros in normalised space), as the references do. The result
    is cast to `dtype` (the stage's weights), the one input cast of the pipeline.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    layout = grid_layout(images.shape[-2], images.shape[-1], patch_size, grid)
    m = torch.as_tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.as_tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    x = (images[..., : layout.kept[0], : layout.kept[1]] - m) / s
    if any(layout.pad):
        x = F.pad(x, layout.pad)
    return x.to(dtype) if dtype is not None else x


def to_window(scores: torch.Tensor, layout: GridLayout) -> torch.Tensor:
    """A map on the layout's grid as the window's map: `center` with padding is upsampled to the padded
    size (bilinear, align_corners=False) and cropped back to the window (pixel resolution); otherwise the
    grid is returned as it is (the segmenter stretches it over the window)."""
    if layout.policy != "center" or not any(layout.pad):
        return scores
    left, _, top, _ = layout.pad
    up = F.interpolate(scores, size=layout.padded, mode="bilinear", align_corners=False)
    return up[..., top : top + layout.size[0], left : left + layout.size[1]]


def resample_pos_embed(
    pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], mode: str, prefix: int = 1
) -> torch.Tensor:
    """Positional embeddings (prefix + h0*w0, D) or (1, prefix + h0*w0, D) resized to a new patch grid.

    Modes, as each model family's code does it (bicubic, align_corners=False, in float32):
    - `size`: to the exact size (MaskCLIP, mmseg `resize`) -- timm's `resample_abs_pos_embed`, no antialias;
    - `timm`: the same with antialiasing (timm, DINOv2 with registers);
    - `dino`: `scale_factor=((h + 0.1) / h0, (w + 0.1) / w0)` (DINO's `interpolate_pos_encoding`, SCLIP,
      NACLIP, ClearCLIP), which samples differently from `size` and is the one mode timm lacks.
    An unchanged grid returns the table itself. Prefix tokens (class, registers) are untouched.
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos
    batched = pos.ndim == 3
    table = pos if batched else pos[None]
    if mode in ("size", "timm"):
        from timm.layers import resample_abs_pos_embed

        out = resample_abs_pos_embed(table, list(new_grid), list(old_grid), num_prefix_tokens=prefix,
                                     interpolation="bicubic", antialias=mode == "timm")
        return out if batched else out[0]
    if mode != "dino":
        from ovseg.errors import ConfigError

        raise ConfigError(f"unknown positional-embedding resampling {mode!r}; expected size, timm or dino")
    (h0, w0), (h, w) = old_grid, new_grid
    head, grid = table[:, :prefix], table[:, prefix:]
    grid = grid.reshape(1, h0, w0, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / h0, (w + 0.1) / w0), mode="bicubic", align_corners=False)
    if tuple(grid.shape[-2:]) != (h, w):  # guards the float rounding of the scale factor
        raise RuntimeError(f"positional embedding resized to {tuple(grid.shape[-2:])}, expected {(h, w)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(table.dtype)
    out = torch.cat([head, grid], dim=1)
    return out if batched else out[0]
