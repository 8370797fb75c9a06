"""ColorPrototypePredictor: the smallest honest `VLMPredictor`.

It is NOT a vision-language model. Each class name gets a colour derived from a hash of the name
(or one you give in `colors`), and every patch is scored by the cosine between its mean colour and
each class colour, both centred at mid-grey. It has no weights and knows nothing about what words
mean: "sky" is not blue here unless you say so. It exists to show the contract a predictor must
meet, and to give plugin authors something that runs end to end in seconds.
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ovseg.stages import VLMPredictor
from ovseg.vocabulary import Vocabulary


def name_colour(name: str) -> tuple[float, float, float]:
    """A colour in [0, 1]^3 from the name's SHA-256: the same in every process and Python version
    (the built-in `hash` of a string changes between runs)."""
    digest = hashlib.sha256(name.strip().lower().encode("utf-8")).digest()
    return digest[0] / 255.0, digest[1] / 255.0, digest[2] / 255.0


class ColorPrototypePredictor(VLMPredictor):
    """Cosine between each patch's mean colour and a per-name colour prototype.

    Options (the keys of `predictor:` in a method config, or `predictor.<key>=...` overrides):
      patch_size: side of the square patches, in pixels (default 16)
      colors: optional {name: [r, g, b]} in 0..255 that replaces the hashed colour of those names
    """

    def __init__(self, patch_size: int = 16, colors: Mapping[str, Sequence[int]] | None = None):
        super().__init__()
        if int(patch_size) < 1:
            raise ValueError(f"colorproto: patch_size must be a positive integer, got {patch_size!r}")
        self.patch_size = int(patch_size)
        self.colors = {str(k): tuple(float(c) / 255.0 for c in v) for k, v in (colors or {}).items()}
        for name, rgb in self.colors.items():
            if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
                raise ValueError(f"colorproto: colors[{name!r}] must be three values in 0..255")
        # (Q, 3) unit vectors, one per name; a buffer so that .to(device) moves it with the module
        self.register_buffer("prototypes", torch.zeros(0, 3), persistent=False)

    #: windows that are not a multiple of the patch are zero-padded bottom/right (ovseg.pipeline.patches)
    grid = "pad"

    def set_classes(self, vocabulary: Vocabulary | Sequence) -> None:
        """Cache one prototype per name, in the vocabulary's class-major name order."""
        if not isinstance(vocabulary, Vocabulary):
            vocabulary = Vocabulary(vocabulary)
        rgb = torch.tensor([self.colors.get(n, name_colour(n)) for n in vocabulary.names], dtype=torch.float32)
        self.prototypes = F.normalize(rgb - 0.5, dim=1).to(self.prototypes.device)
        self.vocabulary = vocabulary

    @property
    def text_embeddings(self) -> torch.Tensor:
        """(Q, 3): this predictor's "text embeddings" are its colour prototypes."""
        return self.prototypes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) floats in [0, 1] -> raw cosines (B, Q, ceil(H/p), ceil(W/p)), no softmax."""
        if self.prototypes.shape[0] == 0:
            raise RuntimeError("colorproto: call set_classes(...) before scoring images")
        p = self.patch_size
        h, w = images.shape[-2:]
        # "normalise" (centre at grey) first, then zero-pad bottom/right to a multiple of the patch,
        # as every stage does; padded pixels then count as grey
        x = F.pad(images.float() - 0.5, (0, -w % p, 0, -h % p))
        patches = F.normalize(F.avg_pool2d(x, p), dim=1)  # (B, 3, h, w); an exactly grey patch stays 0
        return torch.einsum("bchw,qc->bqhw", patches, self.prototypes.float())  # float32, as every stage returns
