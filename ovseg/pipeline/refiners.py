"""The `none` refiner: plain sliding-window inference (the segmenter's merge, nothing else)."""

from __future__ import annotations

from .stages import Refiner

__all__ = ["NoRefiner"]


class NoRefiner(Refiner):
    """Each window's scores resized bilinearly to its box and averaged where windows overlap.

    All three refiner steps are the identity: the merge between them is the segmenter's.
    """

    needs_features = False
