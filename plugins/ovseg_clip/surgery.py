"""What the multi-layer CLIP methods (SC-CLIP, ResCLIP) share: a predictor base whose options index
blocks of the image tower, checked against its depth once the weights are loaded.

Both methods read the outputs or attention maps of intermediate blocks, so a layer index is only
meaningful for a given depth: an index the tower does not have is a ConfigError naming the option,
never an IndexError deep inside the forward pass.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ovseg.errors import ConfigError
from ovseg.pipeline.options import integer

from .predictors import ClipDensePredictor


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """(images - mean) / std of (B, 3, H, W) images in [0, 1], the whole window, in float32 or float64."""
    images = images.to(torch.promote_types(images.dtype, torch.float32))
    m = torch.as_tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.as_tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - m) / s


class MultiLayerPredictor(ClipDensePredictor):
    """A dense CLIP predictor whose options name blocks of the image tower (validated against its depth).

    Subclasses set their option attributes before calling this constructor; `check_options` sees the
    model (and its depth) only after the weights are loaded, so the constructor validates once more then.
    """

    grid = "floor"

    def __init__(self, model: str, pretrained: str, templates: str, **clip_options: Any):
        super().__init__(model, pretrained, templates, **clip_options)
        self.configure()  # the depth is known now: validate the layer indices

    def _last_block(self):
        return None  # the method runs its own last block (see `features`)

    @property
    def depth(self) -> int | None:
        """Number of blocks of the image tower (None while the weights are not loaded yet)."""
        clip = self._modules.get("clip")
        return None if clip is None else len(clip.visual.transformer.resblocks)

    def layer(self, value: Any, name: str, *, last: int | None = None) -> int:
        """A block index in [0, last] (default: the second-to-last block), the error naming the depth."""
        depth = self.depth
        last = depth - 2 if last is None else last
        value = integer(value, name, self.stage_name)
        if not 0 <= value <= last:
            raise ConfigError(
                f"{self.stage_name}: {name} must be a block index between 0 and {last} for this "
                f"{depth}-layer image tower, got {value}"
            )
        return value

    def layers(self, values: Iterable[Any], name: str) -> tuple[int, ...]:
        if isinstance(values, (str, bytes, int, float)) or not values:
            raise ConfigError(f"{self.stage_name}: {name} must be a non-empty list of block indices, got {values!r}")
        out = tuple(self.layer(v, name) for v in values)
        if len(set(out)) != len(out):
            raise ConfigError(f"{self.stage_name}: {name} lists a block twice: {list(out)}")
        return out
