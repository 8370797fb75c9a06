"""Public import path of the segmenter that composes the stages; the code lives in `ovseg.pipeline.segmenter`."""

from .pipeline.segmenter import (  # noqa: F401
    Segmenter,
    Segmentation,
    apply_thresholds,
    to_float_image,
)

__all__ = ["Segmenter", "Segmentation", "apply_thresholds", "to_float_image"]
