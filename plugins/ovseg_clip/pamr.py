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
from ovseg.pipeline.options import choice, integer
from ovseg.pipeline.stages import Refiner

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


#: scores refined together: a chunk (and its padded copies) stays in a CPU's last-level cache across the 16
#: neighbour updates of an iteration. Classes are refined independently, so chunking changes no result.
CHUNK_BYTES = 8 << 20


def pamr(
    image: torch.Tensor, scores: torch.Tensor, num_iter: int = 10, dilations: Sequence[int] = (8, 16)
) -> torch.Tensor:
    """Refine scores (B, C, h, w) with images (B, K, H, W); returns (B, C, H, W).

    Scores are first resized to the image (bilinear, align_corners=True, as the reference does).
    """
    if scores.shape[-2:] != image.shape[-2:]:
        scores = F.interpolate(scores, size=image.shape[-2:], mode="bilinear", align_corners=True)
    aff = pamr_affinity(image, dilations)
    per_class = scores.shape[0] * scores.shape[-2] * scores.shape[-1] * scores.element_size()
    chunks = scores.split(max(1, CHUNK_BYTES // per_class), dim=1)
    return torch.cat([_propagate(aff, chunk, num_iter, dilations) for chunk in chunks], dim=1)


def _propagate(aff: torch.Tensor, scores: torch.Tensor, num_iter: int, dilations: Sequence[int]) -> torch.Tensor:
    """`num_iter` steps of: each pixel's scores <- the affinity-weighted sum of its neighbours' (fused multiply-adds)."""
    for _ in range(num_iter):
        out = torch.zeros_like(scores)
        p = 0
        for d in dilations:
            for shifted in _shifts(scores, d, False):
                out.addcmul_(aff[:, :, p], shifted)
                p += 1
        scores = out
    return scores


#: mmseg's `SegDataPreProcessor` statistics in NACLIP's configs (CLIP's, x255, rounded to 3 decimals)
MMSEG_CLIP_MEAN = (122.771, 116.746, 104.094)
MMSEG_CLIP_STD = (68.501, 66.632, 70.323)


class PAMRRefiner(Refiner):
    """PAMR on the merged scores, at the original image size (`at="original"`, NACLIP's order) or at the
    resized size (`at="resized"`, cheaper on large images).

    NACLIP resizes the logits to the original size first and guides PAMR with its model input -- the
    resized image, normalised with mmseg's statistics -- upsampled (bilinear) to that size; `original`
    does exactly that, in that order. The guide is normalised as NACLIP's is, although PAMR's affinities
    are invariant to a per-channel affine map, because flat channels are not: there the bilinear upsampling
    leaves float noise of one ulp, which the affinity divides by a standard deviation of the same size.
    """

    needs_features = False
    options = ("num_iter", "dilations", "at")

    def __init__(self, num_iter: int = 10, dilations: Sequence[int] = (8, 16), at: str = "original"):
        super().__init__()
        self.configure(num_iter=num_iter, dilations=dilations, at=at)

    def check_options(self) -> None:
        self.num_iter = integer(self.num_iter, "num_iter", self.stage_name, minimum=0)
        if isinstance(self.dilations, (str, bytes)) or not isinstance(self.dilations, Sequence) or not self.dilations:
            raise ConfigError(f"{self.stage_name}: dilations must be a list of positive integers, got {self.dilations!r}")
        self.dilations = tuple(integer(d, "dilations", self.stage_name, minimum=1) for d in self.dilations)
        self.at = choice(self.at, "at", ("original", "resized"), self.stage_name)

    def _refine(self, image: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.num_iter == 0:
            return scores
        mean = torch.tensor(MMSEG_CLIP_MEAN, device=image.device).view(3, 1, 1)
        std = torch.tensor(MMSEG_CLIP_STD, device=image.device).view(3, 1, 1)
        guide = ((image.float() * 255).round() - mean) / std  # the uint8 image, normalised as NACLIP's input
        if guide.shape[-2:] != scores.shape[-2:]:
            guide = F.interpolate(guide[None], size=scores.shape[-2:], mode="bilinear", align_corners=False)[0]
        return pamr(guide[None], scores.float()[None], self.num_iter, self.dilations)[0]

    def refine_canvas(self, image: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self._refine(image, scores) if self.at == "resized" else scores

    def refine_output(self, image: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self._refine(image, scores) if self.at == "original" else scores
