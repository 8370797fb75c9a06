"""Evaluation protocol: how an image is resized, windowed and turned into a label map.

Values come from the suite (per dataset), then the method config (`protocol:` and
`datasets.<name>:`), then the command line; `Protocol.from_dict` validates the merged result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from ovseg.errors import ConfigError

from . import options

__all__ = ["Protocol"]


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
        options.unknown_options(values, [f.name for f in fields(cls)], where)
        proto = cls(**values)
        proto.validate(where)
        return proto

    def validate(self, where: str = "protocol") -> None:
        """Check every field's type and range; ConfigError naming the field (`where.field`)."""
        if self.short_side is not None:
            options.integer(self.short_side, f"{where}.short_side", minimum=1)
        options.integer(self.long_side_max, f"{where}.long_side_max", minimum=1)
        stride = options.pair(self.stride, f"{where}.stride")
        if self.crop is not None:
            crop = options.pair(self.crop, f"{where}.crop")
            if stride[0] > crop[0] or stride[1] > crop[1]:
                raise ConfigError(
                    f"{where}.stride {self.stride!r} is larger than crop {self.crop!r}: windows would leave "
                    "gaps; use a stride at most the crop"
                )
        if self.window_batch is not None:
            options.integer(self.window_batch, f"{where}.window_batch", minimum=1)
        for name in ("prob_thd", "area_thd"):
            value = getattr(self, name)
            if value is not None:
                options.number(value, f"{where}.{name}", minimum=0.0, maximum=1.0)
        if self.logit_scale is not None:
            options.number(self.logit_scale, f"{where}.logit_scale", above=0.0)
        if self.prob_thd is not None and self.logit_scale is None:
            raise ConfigError(f"{where}.prob_thd needs logit_scale (the threshold applies to softmax probabilities)")
        options.integer(self.background_index, f"{where}.background_index", minimum=0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """mmcv `rescale_size` with keep_ratio: scale = min(long_max/long, short/short), round half up."""
        if self.short_side is None:
            return height, width
        scale = min(self.long_side_max / max(height, width), self.short_side / min(height, width))
        return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
