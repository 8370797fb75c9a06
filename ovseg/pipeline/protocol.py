"""Evaluation protocol: how an image is resized, windowed and turned into a label map.

Values come from the suite (per dataset), then the method config (`protocol:` and
`datasets.<name>:`), then the command line; `Protocol.from_dict` validates the merged result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from ovseg.errors import ConfigError

__all__ = ["Protocol", "PRECISIONS", "ACCELERATORS"]


#: numeric precisions a run may use (Lightning's names); kept here, free of torch, for the CLI's choices
PRECISIONS = ("32-true", "32", "bf16-true", "bf16-mixed", "16-true", "16-mixed")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


@dataclass(frozen=True)
class Protocol:
    #: the image is resized so its short side is this (keeping the ratio); None keeps its size
    short_side: int | None = 448
    #: cap on the long side after resizing (mmseg `Resize(scale=(long_side_max, short_side))`)
    long_side_max: int = 2048
    #: sliding-window crop and stride (int or [h, w]); crop None = one window over the whole image
    crop: Any = 224
    stride: Any = 112
    #: windows per forward pass; None = all windows of the image in one batch
    window_batch: int | None = None
    #: temperature for softmax over all names (SCLIP family); None = raw scores, no softmax
    logit_scale: float | None = None
    #: pixels whose best class probability is below this become `background_index`
    prob_thd: float | None = None
    #: SCLIP: non-background classes covering at most this fraction of the predicted foreground are dropped
    area_thd: float | None = None
    background_index: int = 0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None, where: str = "protocol") -> "Protocol":
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown protocol option(s) {unknown}; known: {sorted(known)}")
        proto = cls(**values)
        proto.validate(where)
        return proto

    def validate(self, where: str = "protocol") -> None:
        def positive(name, v):
            vs = v if isinstance(v, (list, tuple)) else [v]
            if len(vs) not in (1, 2) or not all(isinstance(x, int) and x > 0 for x in vs):
                raise ConfigError(f"{where}.{name} must be a positive integer or an [h, w] pair, got {v!r}")

        if self.short_side is not None:
            positive("short_side", self.short_side)
        positive("long_side_max", self.long_side_max)
        if self.crop is not None:
            positive("crop", self.crop)
        positive("stride", self.stride)
        if self.window_batch is not None:
            positive("window_batch", self.window_batch)
        for name in ("prob_thd", "area_thd"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= float(v) <= 1.0:
                raise ConfigError(f"{where}.{name} must be in [0, 1], got {v!r}")
        if self.prob_thd is not None and self.logit_scale is None:
            raise ConfigError(f"{where}.prob_thd needs logit_scale (the threshold applies to softmax probabilities)")
        if self.logit_scale is not None and float(self.logit_scale) <= 0:
            raise ConfigError(f"{where}.logit_scale must be positive, got {self.logit_scale!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """mmcv `rescale_size` with keep_ratio: scale = min(long_max/long, short/short), round half up."""
        if self.short_side is None:
            return height, width
        scale = min(self.long_side_max / max(height, width), self.short_side / min(height, width))
        return int(height * scale + 0.5), int(width * scale + 0.5)
