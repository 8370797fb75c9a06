"""LPOSS and LPOSS+ refiners: patch label propagation over all windows jointly (+ pixel propagation).

`LPOSSRefiner` builds one kNN graph over the patches of every window of the image and propagates the
VLM's raw scores on it (`propagate_patches`): its windows step; the segmenter then merges the windows
as for every refiner. `LPOSSPlusRefiner` adds a canvas step: it propagates the merged map over the
pixel graph of the resized image (`propagate_pixels`). Outputs are float32 (float64 if the scores are
float64), whatever the scores' dtype, because the solvers run in float32 at least.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ovseg.errors import ConfigError
from ovseg.pipeline.options import integer, number
from ovseg.pipeline.stages import Refiner

from .patch_lp import propagate_patches
from .pixel_lp import propagate_pixels


def infer_patch_size(boxes: torch.Tensor, grid: tuple[int, int]) -> int:
    """The patch size p with `ceil(box side / p) == grid side` for every window, taken as small as possible.

    Feature extractors zero-pad windows to a multiple of their patch size, so a (h', w') grid on a
    box of side s means p in [s/h', s/(h'-1)); the smallest integer is exact for the usual windows.
    """
    sizes = torch.stack([boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]], dim=1).tolist()
    gh, gw = grid
    p = max(math.ceil(max(s[0] for s in sizes) / gh), math.ceil(max(s[1] for s in sizes) / gw))
    if any(math.ceil(sh / p) != gh or math.ceil(sw / p) != gw for sh, sw in sizes):
        raise ConfigError(
            f"cannot infer the feature patch size from windows {sorted(set(map(tuple, sizes)))} and grid "
            f"{gh}x{gw}; set the refiner's patch_size"
        )
    return p


def patch_centers(boxes: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(W·h·w, 2) patch-centre pixel coordinates `(y1 + p//2 + p·row, x1 + p//2 + p·col)`, window-major."""
    gh, gw = grid
    rows = torch.arange(gh, device=boxes.device) * patch_size + patch_size // 2
    cols = torch.arange(gw, device=boxes.device) * patch_size + patch_size // 2
    y = boxes[:, 0, None, None] + rows[None, :, None]
    x = boxes[:, 2, None, None] + cols[None, None, :]
    return torch.stack(torch.broadcast_tensors(y, x), dim=-1).reshape(-1, 2)


class LPOSSRefiner(Refiner):
    """LPOSS: label propagation over the patches of all windows (the windows step; the segmenter merges)."""

    needs_features = True
    options = ("k", "gamma", "sigma", "pix_dist_pow", "alpha", "tol", "maxiter", "patch_size")

    def __init__(
        self,
        k: int = 400,
        gamma: float = 3.0,
        sigma: float = 0.01,
        pix_dist_pow: float = 1.0,
        alpha: float = 0.95,
        tol: float = 1e-6,
        maxiter: int = 10,
        patch_size: int | None = None,
    ):
        super().__init__()
        self.configure(k=k, gamma=gamma, sigma=sigma, pix_dist_pow=pix_dist_pow, alpha=alpha, tol=tol,
                       maxiter=maxiter, patch_size=patch_size)

    def check_options(self) -> None:
        """Validate and normalise the patch-stage options (typed: `k=2.5` or `k=true` are refused)."""
        owner = self.stage_name
        self.k = integer(self.k, "k", owner, minimum=1)
        self.maxiter = integer(self.maxiter, "maxiter", owner, minimum=0)
        self.alpha = number(self.alpha, "alpha", owner, minimum=0.0, below=1.0)
        self.gamma = number(self.gamma, "gamma", owner)
        self.sigma = number(self.sigma, "sigma", owner, minimum=0.0)
        self.pix_dist_pow = number(self.pix_dist_pow, "pix_dist_pow", owner)
        self.tol = number(self.tol, "tol", owner, minimum=0.0)
        self.patch_size = None if self.patch_size is None else integer(self.patch_size, "patch_size", owner, minimum=1)

    def refine_windows(self, image, boxes, scores, features) -> torch.Tensor:
        """Patch LP over all windows: (W, Q, h, w) scores, (W, D, h', w') features -> (W, Q, h', w').

        Scores on another grid than the features (CLIP /16 with DINOv2 /14, a VFM's /8 grid, pixels) are
        resampled bilinearly to the feature grid first.
        """
        if features is None:
            raise ConfigError(f"{type(self).__name__} needs patch features: configure an extractor (e.g. dino)")
        if scores.ndim != 4 or features.ndim != 4 or scores.shape[0] != features.shape[0] or len(boxes) != scores.shape[0]:
            raise ValueError(
                f"expected scores (W, Q, h, w), features (W, D, h', w') and W boxes; got {tuple(scores.shape)}, "
                f"{tuple(features.shape)}, {len(boxes)} boxes"
            )
        n, q = scores.shape[:2]
        grid = tuple(features.shape[-2:])
        dtype = torch.promote_types(scores.dtype, torch.float32)
        scores = scores.to(dtype)
        if tuple(scores.shape[-2:]) != grid:
            scores = F.interpolate(scores, size=grid, mode="bilinear", align_corners=False)
        p = self.patch_size or infer_patch_size(boxes, grid)
        feats = F.normalize(features.to(device=scores.device, dtype=dtype).flatten(2).transpose(1, 2), dim=-1)
        out = propagate_patches(
            scores.flatten(2).transpose(1, 2).reshape(-1, q),
            feats.reshape(-1, feats.shape[-1]),
            patch_centers(boxes.to(scores.device), grid, p).to(dtype),
            k=self.k,
            gamma=self.gamma,
            sigma=self.sigma,
            pix_dist_pow=self.pix_dist_pow,
            alpha=self.alpha,
            tol=self.tol,
            maxiter=self.maxiter,
        )
        return out.view(n, grid[0], grid[1], q).permute(0, 3, 1, 2)


class LPOSSPlusRefiner(LPOSSRefiner):
    """LPOSS+: LPOSS, then label propagation over the pixels of the resized image (Lab colour graph)."""

    options = LPOSSRefiner.options + ("radius", "tau", "pixel_alpha", "pixel_tol", "pixel_maxiter")

    def __init__(
        self,
        k: int = 400,
        gamma: float = 3.0,
        sigma: float = 0.01,
        pix_dist_pow: float = 1.0,
        alpha: float = 0.95,
        tol: float = 1e-6,
        maxiter: int = 10,
        radius: int = 6,
        tau: float = 0.01,
        pixel_alpha: float | None = None,
        pixel_tol: float | None = None,
        pixel_maxiter: int | None = None,
        patch_size: int | None = None,
    ):
        """`radius` 6 is the reference's r = 13 window; `pixel_*` None means the patch stage's value."""
        Refiner.__init__(self)
        self.configure(k=k, gamma=gamma, sigma=sigma, pix_dist_pow=pix_dist_pow, alpha=alpha, tol=tol,
                       maxiter=maxiter, patch_size=patch_size, radius=radius, tau=tau, pixel_alpha=pixel_alpha,
                       pixel_tol=pixel_tol, pixel_maxiter=pixel_maxiter)

    def check_options(self) -> None:
        super().check_options()
        owner = self.stage_name
        self.radius = integer(self.radius, "radius", owner, minimum=0)
        self.tau = number(self.tau, "tau", owner, above=0.0)
        if self.pixel_alpha is not None:
            self.pixel_alpha = number(self.pixel_alpha, "pixel_alpha", owner, minimum=0.0, below=1.0)
        if self.pixel_tol is not None:
            self.pixel_tol = number(self.pixel_tol, "pixel_tol", owner, minimum=0.0)
        if self.pixel_maxiter is not None:
            self.pixel_maxiter = integer(self.pixel_maxiter, "pixel_maxiter", owner, minimum=0)

    def refine_canvas(self, image, scores) -> torch.Tensor:
        """Pixel LP of the merged map over the resized image's Lab graph."""
        return propagate_pixels(
            image.to(scores.device),
            scores,
            radius=self.radius,
            tau=self.tau,
            alpha=self.alpha if self.pixel_alpha is None else self.pixel_alpha,
            tol=self.tol if self.pixel_tol is None else self.pixel_tol,
            maxiter=self.maxiter if self.pixel_maxiter is None else self.pixel_maxiter,
        )
