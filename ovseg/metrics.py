"""Public import path of mIoU and Boundary IoU; the code lives in `ovseg.evaluation.metrics`."""

from .evaluation.metrics import (  # noqa: F401
    IoU,
    BoundaryIoU,
)

__all__ = ["IoU", "BoundaryIoU"]
