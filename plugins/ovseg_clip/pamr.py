"""PAMR (pixel-adaptive mask refinement, Araslanov & Roth, CVPR'20) as NACLIP applies it.

Each iteration replaces every pixel's scores by an affinity-weighted average of its 8 neighbours at
each dilation. Affinities come from the image: `-|I_i - I_j| / (1e-8 + 0.1 · std)` per channel
(std over the 3x3 neighbourhoods of all dilations, centre included, unbiased), mean over channels,
softmax over the neighbours. Borders are replicate-padded. NACLIP: 10 iterations, dilations (8, 16).

Written with padded slices instead of the reference's shift-kernel convolutions so the score
update never materialises a (classes x neighbours x H x W) tensor.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ovseg.errors import ConfigError
from ovseg.pipeline.stages import Refiner
from ovseg.pipeline.windows import merge_windows

_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def _shifts(x: torch.Tensor, dilation: int, centre: bool) -> list[torch.Tensor]:
    """x (B, C, H, W) read at offsets (dy·d, dx·d), replicate-padded, in row-major 3x3 order."""
    h, w = x.shape[-2:]
    d = dilation
    xp = F.pad(x, [d, d, d, d], mode="replicate")
    return [
        xp[:, :, d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w]
        for dy, dx in _OFFSETS
        if centre or (dy, dx) != (0, 0)
    ]


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """Neighbour weights (B, 1, 8·len(dilations), H, W) of images (B, K, H, W); they sum to 1 over dim 2."""
    with_centre = torch.stack([s for d in dilations for s in _shifts(image, d, True)], dim=2)
    std = with_centre.std(dim=2, keepdim=True)
    neigh = torch.stack([s for d in dilations for s in _shifts(image, d, False)], dim=2)
    aff = -(image.unsqueeze(2) - neigh).abs() / (1e-8 + 0.1 * std)
    return aff.mean(dim=1, keepdim=True).softmax(dim=2)


def pamr(
    image: torch.Tensor, scores: torch.Tensor, num_iter: int = 10, dilations: Sequence[int] = (8, 16)
) -> torch.Tensor:
    """Refine scores (B, C, h, w) with images (B, K, H, W); returns (B, C, H, W).

    Scores are first resized to the image (bilinear, align_corners=True, as the reference does).
    """
    if scores.shape[-2:] != image.shape[-2:]:
        scores = F.interpolate(scores, size=image.shape[-2:], mode="bilinear", align_corners=True)
    aff = pamr_affinity(image, dilations)
    for _ in range(num_iter):
        out = torch.zeros_like(scores)
        p = 0
        for d in dilations:
            for shifted in _shifts(scores, d, False):
                out += aff[:, :, p] * shifted
                p += 1
        scores = out
    return scores


class PAMRRefiner(Refiner):
    """Sliding-window merge (as the `none` refiner), then PAMR on the resized image.

    NACLIP runs PAMR after resizing to the original image size; here it runs at the resized
    (protocol) size, which is what a refiner sees.
    """

    needs_features = False

    def __init__(self, num_iter: int = 10, dilations: Sequence[int] = (8, 16)):
        super().__init__()
        if int(num_iter) < 0:
            raise ConfigError(f"num_iter must be >= 0, got {num_iter!r}")
        dilations = tuple(int(d) for d in dilations)
        if not dilations or min(dilations) <= 0:
            raise ConfigError(f"dilations must be positive integers, got {dilations!r}")
        self.num_iter = int(num_iter)
        self.dilations = dilations

    def extra_repr(self) -> str:
        return f"num_iter={self.num_iter}, dilations={self.dilations}"

    def forward(self, image, boxes, scores, features=None) -> torch.Tensor:
        h, w = image.shape[-2:]
        merged = merge_windows(scores.float(), boxes, h, w)
        return pamr(image.float()[None], merged[None], self.num_iter, self.dilations)[0]
