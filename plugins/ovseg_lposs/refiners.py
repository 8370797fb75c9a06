"""LPOSS and LPOSS+ refiners: patch label propagation over all windows jointly (+ pixel propagation).

`LPOSSRefiner` builds one kNN graph over the patches of every window of the image, propagates the
VLM's raw scores on it (`propagate_patches`) and merges the windows on the canvas like the `none`
refiner. `LPOSSPlusRefiner` then propagates the merged map over the pixel graph of the resized image
(`propagate_pixels`). Outputs are float32 (float64 if the scores are float64), whatever the scores'
dtype, because the solvers run in float32 at least.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

from ovseg.errors import ConfigError
from ovseg.pipeline.stages import Refiner
from ovseg.pipeline.windows import merge_windows

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
    """LPOSS: label propagation over the patches of all windows, then the windows merged on the canvas."""

    needs_features = True

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

    def configure(self, **options) -> None:
        """Set options (construction and per-dataset overrides); unknown names or bad values are errors
        and leave the refiner as it was."""
        known = self._options()
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(f"{type(self).__name__}: unknown option(s) {unknown}; known: {sorted(known)}")
        previous = dict(self.__dict__)
        self.__dict__.update(options)
        try:
            self._check()
        except (ConfigError, TypeError, ValueError) as exc:
            self.__dict__.clear()
            self.__dict__.update(previous)
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"{type(self).__name__}: bad option value in {options}: {exc}") from exc

    def _check(self) -> None:
        """Validate and normalise the patch-stage options."""
        if self.k < 1 or self.maxiter < 0 or not 0.0 <= self.alpha < 1.0:
            raise ConfigError(
                f"invalid LPOSS parameters: k={self.k}, maxiter={self.maxiter}, alpha={self.alpha} "
                "(need k>=1, maxiter>=0, 0<=alpha<1)"
            )
        self.k, self.maxiter = int(self.k), int(self.maxiter)
        self.gamma, self.sigma, self.pix_dist_pow = float(self.gamma), float(self.sigma), float(self.pix_dist_pow)
        self.alpha, self.tol = float(self.alpha), float(self.tol)
        self.patch_size = None if self.patch_size is None else int(self.patch_size)

    @classmethod
    def _options(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, gamma={self.gamma}, sigma={self.sigma}, pix_dist_pow={self.pix_dist_pow}, "
            f"alpha={self.alpha}, tol={self.tol}, maxiter={self.maxiter}"
        )

    def propagate_windows(self, boxes: torch.Tensor, scores: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Patch LP over all windows: (W, Q, h, w) scores, (W, D, h', w') features -> (W, Q, h', w')."""
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
        if tuple(scores.shape[-2:]) != grid:  # e.g. CLIP /16 scores with DINOv2 /14 features
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

    def forward(self, image, boxes, scores, features) -> torch.Tensor:
        windows = self.propagate_windows(boxes, scores, features)
        return merge_windows(windows, boxes, image.shape[-2], image.shape[-1])


class LPOSSPlusRefiner(LPOSSRefiner):
    """LPOSS+: LPOSS, then label propagation over the pixels of the resized image (Lab colour graph)."""

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
        # the pixel options exist before the base constructor validates the patch options
        self.__dict__.update(radius=radius, tau=tau, pixel_alpha=pixel_alpha, pixel_tol=pixel_tol,
                             pixel_maxiter=pixel_maxiter)
        super().__init__(k, gamma, sigma, pix_dist_pow, alpha, tol, maxiter, patch_size)

    def _check(self) -> None:
        super()._check()
        if self.radius < 0 or self.tau <= 0:
            raise ConfigError(f"invalid LPOSS+ pixel parameters: radius={self.radius}, tau={self.tau}")
        self.radius, self.tau = int(self.radius), float(self.tau)
        self.pixel_alpha = None if self.pixel_alpha is None else float(self.pixel_alpha)
        self.pixel_tol = None if self.pixel_tol is None else float(self.pixel_tol)
        self.pixel_maxiter = None if self.pixel_maxiter is None else int(self.pixel_maxiter)

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", radius={self.radius}, tau={self.tau}, pixel_alpha={self.pixel_alpha}, pixel_maxiter={self.pixel_maxiter}"
        )

    def forward(self, image, boxes, scores, features) -> torch.Tensor:
        merged = super().forward(image, boxes, scores, features)
        return propagate_pixels(
            image.to(merged.device),
            merged,
            radius=self.radius,
            tau=self.tau,
            alpha=self.alpha if self.pixel_alpha is None else self.pixel_alpha,
            tol=self.tol if self.pixel_tol is None else self.pixel_tol,
            maxiter=self.maxiter if self.pixel_maxiter is None else self.pixel_maxiter,
        )
