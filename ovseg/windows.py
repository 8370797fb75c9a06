"""Public import path of sliding-window geometry and merging; the code lives in `ovseg.pipeline.windows`."""

from .pipeline.windows import (  # noqa: F401
    sliding_windows,
    crop_windows,
    merge_windows,
)

__all__ = ["sliding_windows", "crop_windows", "merge_windows"]
