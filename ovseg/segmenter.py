"""Public import path of the segmenter that composes the stages; the code lives in `ovseg.pipeline.segmenter`."""

from .pipeline.segmenter import (  # noqa: F401
    Segmenter,
    Segmentation,
    ResizedImage,
    apply_thresholds,
    resize_for,
)

__all__ = ["Segmenter", "Segmentation", "ResizedImage", "apply_thresholds", "resize_for"]
