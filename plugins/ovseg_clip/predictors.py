"""CLIP-family VLM predictors: clip, maskclip, sclip, clearclip, naclip.

All five share `ClipDensePredictor`: weights via `weights.load_clip`, text embeddings via
`set_classes`, and the dense forward of `dense.py`; a subclass only names its last block
(`dense.LAST_BLOCKS`). Output: raw cosines (B, Q, ceil(H/p), ceil(W/p)), float32 whatever the
module's dtype, so refiners and metrics never see bfloat16 rounding of the scores.
"""

from __future__ import annotations

import os
from functools import partial
from typing import ClassVar, Sequence

import open_clip
import torch
import torch.nn.functional as F

from ovseg.errors import ConfigError
from ovseg.pipeline.stages import VLMPredictor, module_dtype, prepare_images
from ovseg.pipeline.vocabulary import Vocabulary

from .dense import LAST_BLOCKS, LastBlock, check_vit, cosine_scores, dense_features, naclip_block
from .templates import get_templates
from .weights import load_clip

_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ClipDensePredictor(VLMPredictor):
    """Dense CLIP predictor; subclasses set `method` (a key of `dense.LAST_BLOCKS`).

    Args:
        model: open_clip architecture name (`ViT-B-16`, `ovseg-tiny-vit`, ...).
        pretrained: open_clip tag, path to an open_clip or OpenAI checkpoint, or "random"
            (see `ovseg_clip.weights` for how `model` and a checkpoint interact).
        templates: "imagenet80" (the 80 OpenAI ImageNet templates) or "single".
        cache_dir: where open_clip tags are looked up / downloaded (None: the usual caches).
        quick_gelu: force the activation (None: from the tag, config or checkpoint format).
        precision: dtype the module is cast to after loading ("fp32", "bf16", "fp16"); the engine
            may also cast it later with `.to()`.
        text_batch_size: prompts per `encode_text` call.
        seed: seed of the random weights when pretrained="random".
    """

    method: ClassVar[str] = "clip"

    def __init__(
        self,
        model: str = "ViT-B-16",
        pretrained: str = "openai",
        templates: str = "imagenet80",
        cache_dir: str | None = None,
        quick_gelu: bool | None = None,
        precision: str = "fp32",
        text_batch_size: int = 256,
        seed: int = 0,
    ):
        super().__init__()
        if precision not in _PRECISIONS:
            raise ConfigError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
        if int(text_batch_size) <= 0:
            raise ConfigError(f"text_batch_size must be positive, got {text_batch_size!r}")
        self.templates_name = templates
        self.templates = get_templates(templates)
        self.text_batch_size = int(text_batch_size)
        loaded = load_clip(
            model,
            pretrained,
            quick_gelu=quick_gelu,
            cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
            seed=seed,
        )
        check_vit(loaded.model.visual)
        self.clip = loaded.model
        self.model_name = model
        self.pretrained = str(pretrained)
        self.weights_source = loaded.source
        self.random_weights: bool = loaded.random_weights
        self.mean, self.std = loaded.mean, loaded.std
        self.patch_size: int = int(self.clip.visual.patch_size[0])
        if loaded.tokenizer_name is not None:
            self.tokenizer = open_clip.get_tokenizer(loaded.tokenizer_name)
        else:
            self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=self.clip.context_length)
        self.last_block: LastBlock = self._last_block()
        self.vocabulary: Vocabulary | None = None
        self._text: torch.Tensor | None = None  # (Q, E) float32, not a buffer: never cast to bf16
        self._text_cache: dict[str, torch.Tensor] = {}
        self._text_cache_key: tuple | None = None
        self.to(_PRECISIONS[precision])

    def _last_block(self) -> LastBlock:
        return LAST_BLOCKS[self.method]

    def extra_repr(self) -> str:
        return f"method={self.method}, weights={self.weights_source}, templates={self.templates_name}"

    # -- text -------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_names(self, names: Sequence[str]) -> torch.Tensor:
        """(len(names), E) float32: per name, normalise each template embedding, mean, normalise."""
        device = next(self.clip.parameters()).device
        prompts = [t(name) for name in names for t in self.templates]
        chunks = []
        for i in range(0, len(prompts), self.text_batch_size):
            tokens = self.tokenizer(prompts[i : i + self.text_batch_size]).to(device)
            chunks.append(F.normalize(self.clip.encode_text(tokens).float(), dim=-1))
        emb = torch.cat(chunks).view(len(names), len(self.templates), -1).mean(dim=1)
        return F.normalize(emb, dim=-1)

    def set_classes(self, vocabulary: Vocabulary | Sequence) -> None:
        """Encode (only the names not encoded before with this dtype/device) and cache the queries."""
        vocab = vocabulary if isinstance(vocabulary, Vocabulary) else Vocabulary(vocabulary)
        param = next(self.clip.parameters())
        key = (param.dtype, param.device)
        if key != self._text_cache_key:
            self._text_cache, self._text_cache_key = {}, key
        missing = [n for n in dict.fromkeys(vocab.names) if n not in self._text_cache]
        if missing:
            self._text_cache.update(zip(missing, self.encode_names(missing)))
        self.vocabulary = vocab
        self._text = torch.stack([self._text_cache[n] for n in vocab.names])

    @property
    def text_embeddings(self) -> torch.Tensor:
        if self._text is None:
            raise RuntimeError(f"{type(self).__name__}: call set_classes(...) before predicting")
        return self._text

    # -- images -----------------------------------------------------------------------------

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 patch features (B, h, w, E) of images (B, 3, H, W) in [0, 1]."""
        x = prepare_images(images, self.mean, self.std, self.patch_size, dtype=module_dtype(self))
        return dense_features(self.clip.visual, x, self.last_block)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Raw cosines (B, Q, ceil(H/p), ceil(W/p)) between patch features and the cached names."""
        text = self.text_embeddings
        feats = self.features(images)
        if text.device != feats.device:
            self._text = text = text.to(feats.device)
        return cosine_scores(feats, text)


class CLIPPredictor(ClipDensePredictor):
    """Vanilla CLIP: last block unchanged (q-k attention, residual, FFN)."""

    method = "clip"


class MaskCLIPPredictor(ClipDensePredictor):
    """MaskCLIP (ECCV'22): last block's attention replaced by its value path; residual and FFN kept."""

    method = "maskclip"


class SCLIPPredictor(ClipDensePredictor):
    """SCLIP (ECCV'24): correlative self-attention softmax(qqᵀ)+softmax(kkᵀ), residual and FFN kept."""

    method = "sclip"


class ClearCLIPPredictor(ClipDensePredictor):
    """ClearCLIP (ECCV'24): q-q attention without residual and FFN."""

    method = "clearclip"


class NACLIPPredictor(ClipDensePredictor):
    """NACLIP (WACV'25): k-k attention plus a Gaussian neighbourhood bias, without residual and FFN.

    `gaussian_std` is the bias's standard deviation in patches (5 in the paper).
    """

    method = "naclip"

    def __init__(
        self,
        model: str = "ViT-B-16",
        pretrained: str = "openai",
        templates: str = "imagenet80",
        cache_dir: str | None = None,
        quick_gelu: bool | None = None,
        precision: str = "fp32",
        text_batch_size: int = 256,
        seed: int = 0,
        gaussian_std: float = 5.0,
    ):
        if not float(gaussian_std) > 0:
            raise ConfigError(f"gaussian_std must be positive, got {gaussian_std!r}")
        self.gaussian_std = float(gaussian_std)  # read by _last_block during the base __init__
        super().__init__(model, pretrained, templates, cache_dir, quick_gelu, precision, text_batch_size, seed)

    def _last_block(self) -> LastBlock:
        base = LAST_BLOCKS["naclip"]
        return LastBlock(base.name, partial(naclip_block, std=self.gaussian_std), base.pos_interp)
