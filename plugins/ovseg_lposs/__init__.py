"""LPOSS and LPOSS+ refiners (label propagation over patches and pixels) and their two solvers.

`propagate_patches` and `propagate_pixels` are plain functions on tensors; the refiners registered as
`lposs` and `lposs_plus` live in `ovseg_lposs.refiners`.
"""

from .patch_lp import propagate_patches
from .pixel_lp import propagate_pixels

__all__ = ["propagate_patches", "propagate_pixels"]
