"""ovseg first-party plugin package ovseg_floss: FLOSS template experts (predictor `floss`).

`FLOSSPredictor` (registered as `floss`) runs a NACLIP or MaskCLIP host of `ovseg_clip` with per-name
expert text classifiers and fuses them; `fuse_experts` and `entropy_statistics` are the two pieces of
math as plain functions on tensors.
"""

from .fusion import fuse_experts
from .statistics import entropy_statistics

__all__ = ["fuse_experts", "entropy_statistics"]
