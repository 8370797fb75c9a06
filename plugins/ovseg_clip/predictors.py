"""CLIP-family VLM predictors: clip, maskclip, sclip, clearclip, naclip.

All five share `ClipDensePredictor`: weights via `weights.load_clip`, text embeddings via
`set_classes`, and the dense forward of `dense.py`; a subclass only names its last block
(`dense.LAST_BLOCKS`) and its authors' patch-grid policy. Output: raw cosines (B, Q, h, w) on the
patch grid (`floor`/`pad`) or, for `center` windows that needed padding, at pixel resolution; float32
whatever the module's dtype, so refiners and metrics never see bfloat16 rounding of the scores.
"""

from __future__ import annotations

import os
from functools import partial
from typing import ClassVar, Sequence

import open_clip
import torch
import torch.nn.functional as F

from ovseg.pipeline.options import integer, number
from ovseg.pipeline.patches import grid_layout, prepare_images, to_window
from ovseg.pipeline.stages import VLMPredictor
from ovseg.pipeline.vocabulary import Vocabulary
from ovseg.pipeline.text import weights_version
from ovseg.runtime import module_device, module_dtype
from ovseg.text_cache import cached_embeddings, digest, file_digest

from .dense import LAST_BLOCKS, LastBlock, check_vit, cosine_scores, dense_features, naclip_block
from .templates import get_templates
from .text import encode_tokens, text_parameters, tower_signature
from .weights import load_clip


class ClipDensePredictor(VLMPredictor):
    """Dense CLIP predictor; subclasses set `method` (a key of `dense.LAST_BLOCKS`).

    Args:
        model: open_clip architecture name (`ViT-B-16`, `ovseg-tiny-vit`, ...).
        pretrained: open_clip tag, path to an open_clip or OpenAI checkpoint, or "random"
            (see `ovseg_clip.weights` for how `model` and a checkpoint interact).
        templates: "imagenet80" (the 80 OpenAI ImageNet templates) or "single".
        cache_dir: where open_clip tags are looked up / downloaded (None: the usual caches).
        quick_gelu: force the activation (None: from the tag, config or checkpoint format).
        text_batch_size: prompts per `encode_text` call.
        seed: seed of the random weights when pretrained="random".
        grid: patch-grid policy for windows that are not a multiple of 16 (`pad`, `floor`, `center`; see
            `ovseg.pipeline.patches`); the default is the method's own code.

    Precision is a run setting (`--precision`, `ovseg.runtime`), not a predictor option.
    """

    method: ClassVar[str] = "clip"
    options = ("grid",)

    def __init__(
        self,
        model: str = "ViT-B-16",
        pretrained: str = "openai",
        templates: str = "imagenet80",
        cache_dir: str | None = None,
        quick_gelu: bool | None = None,
        text_batch_size: int = 256,
        seed: int = 0,
        grid: str | None = None,
    ):
        super().__init__()
        self.configure(grid=grid or type(self).grid)
        self.templates_name = templates
        self.templates = get_templates(templates)
        self.text_batch_size = integer(text_batch_size, "text_batch_size", self.stage_name, minimum=1)
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
        # what the weights are (for the disk cache of text embeddings), valid while they are not modified
        self._weights_id = (
            f"random {model} quick_gelu={bool(quick_gelu)} seed={seed} open_clip {open_clip.__version__} torch {torch.__version__}"
            if loaded.random_weights else None
        )
        self._weights_path = loaded.path
        self._weights_version = weights_version(text_parameters(self.clip))

    def check_options(self) -> None:
        self.check_grid()

    def _last_block(self) -> LastBlock:
        return LAST_BLOCKS[self.method]

    def extra_repr(self) -> str:
        return f"method={self.method}, weights={self.weights_source}, templates={self.templates_name}, " + super().extra_repr()

    # -- text -------------------------------------------------------------------------------

    def text_key(self) -> dict | None:
        """What fixes a name's embedding besides the name (the disk cache's key), or None when the weights
        cannot be identified (modified in place since they were loaded: nothing is cached on disk).

        Weights: the checkpoint's content digest, or, for random weights, the model, seed and library
        versions (open_clip's initialisation is deterministic given those). Also the model config, the text
        tower's architecture, the tokenizer, the templates and the weights' dtype.
        """
        if weights_version(text_parameters(self.clip)) != self._weights_version:
            return None
        if self._weights_id is None:
            self._weights_id = file_digest(self._weights_path)
        tok = self.tokenizer
        prompts = [t("{}") for t in self.templates]
        return {
            "encoder": "ovseg_clip normalise-mean-normalise",
            "model": self.model_name,
            "weights": self._weights_id,
            "tower": tower_signature(self.clip),
            "tokenizer": [type(tok).__name__, getattr(tok, "context_length", None),
                          getattr(getattr(tok, "tokenizer", None), "name_or_path", None)],
            "templates_name": self.templates_name,
            "templates": digest("\n".join(prompts)),
            "dtype": str(module_dtype(self.clip)).replace("torch.", ""),
        }

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), E) float32: the unit text embedding of each prompt (the one text-tower path).

        Length-sorted batches cut after their longest prompt (`text.encode_tokens`), in the weights' dtype and
        never under autocast (a run's `*-mixed` precision does not change its text embeddings).
        """
        device = module_device(self.clip)
        tokens = self.tokenizer(list(prompts)).to(device)
        with torch.autocast(device.type, enabled=False):
            emb = encode_tokens(self.clip, tokens, self.text_batch_size)
        return F.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def encode_names(self, names: Sequence[str]) -> torch.Tensor:
        """(len(names), E) float32: per name, normalise each template embedding, mean, normalise.

        From the disk cache of text embeddings (`ovseg.text_cache`) where it has them; the others through
        `encode_prompts`.
        """
        return cached_embeddings(self.text_key(), names, self._encode_names).to(module_device(self.clip))

    def _encode_names(self, names: Sequence[str]) -> torch.Tensor:
        prompts = [t(name) for name in names for t in self.templates]
        emb = self.encode_prompts(prompts).view(len(names), len(self.templates), -1).mean(dim=1)
        return F.normalize(emb, dim=-1)

    def set_classes(self, vocabulary: Vocabulary | Sequence) -> None:
        """Encode (only the names not encoded before with these weights and dtype) and cache the queries."""
        vocab = vocabulary if isinstance(vocabulary, Vocabulary) else Vocabulary(vocabulary)
        param = next(self.clip.parameters())
        key = (param.dtype, param.device, weights_version(text_parameters(self.clip)))
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
        """L2-normalised float32 patch features (B, h, w, E) of images (B, 3, H, W) in [0, 1], on the
        patch grid of the predictor's grid policy."""
        x = prepare_images(images, self.mean, self.std, self.patch_size, dtype=module_dtype(self), grid=self.grid)
        return dense_features(self.clip.visual, x, self.last_block)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Raw cosines between patch features and the cached names: (B, Q, h, w) on the patch grid, or
        (B, Q, H, W) for `center` windows that needed padding (see `ovseg.pipeline.patches.to_window`)."""
        text = self.text_embeddings
        feats = self.features(images)
        if text.device != feats.device:
            self._text = text = text.to(feats.device)
        layout = grid_layout(images.shape[-2], images.shape[-1], self.patch_size, self.grid)
        return to_window(cosine_scores(feats, text), layout)


class CLIPPredictor(ClipDensePredictor):
    """Vanilla CLIP: last block unchanged (q-k attention, residual, FFN)."""

    method = "clip"
    grid = "pad"


class MaskCLIPPredictor(ClipDensePredictor):
    """MaskCLIP (ECCV'22): last block's attention replaced by its value path; residual and FFN kept.

    Grid `pad`: LPOSS/CLIP-DINOiser zero-pad bottom/right to a multiple of 16 before the model.
    """

    method = "maskclip"
    grid = "pad"


class SCLIPPredictor(ClipDensePredictor):
    """SCLIP (ECCV'24): correlative self-attention softmax(qqᵀ)+softmax(kkᵀ), residual and FFN kept.

    Grid `floor`: SCLIP's stride-16 patch convolution drops a window's remainder, and `forward_feature`
    stretches the floor grid over the window.
    """

    method = "sclip"
    grid = "floor"


class ClearCLIPPredictor(ClipDensePredictor):
    """ClearCLIP (ECCV'24): q-q attention without residual and FFN.

    Grid `center`: ClearCLIP's `forward_slide` pads a window evenly to a multiple of 16 (`compute_padsize`)
    and crops the upsampled logits back.
    """

    method = "clearclip"
    grid = "center"


class NACLIPPredictor(ClipDensePredictor):
    """NACLIP (WACV'25): k-k attention plus a Gaussian neighbourhood bias, without residual and FFN.

    `gaussian_std` is the bias's standard deviation in patches (5 in the paper). Grid `floor`, windows and
    whole images alike: NACLIP's patch convolution drops the remainder and `forward_feature` stretches
    the floor grid over the input.
    """

    method = "naclip"
    grid = "floor"
    options = ("grid", "gaussian_std")

    def __init__(
        self,
        model: str = "ViT-B-16",
        pretrained: str = "openai",
        templates: str = "imagenet80",
        cache_dir: str | None = None,
        quick_gelu: bool | None = None,
        text_batch_size: int = 256,
        seed: int = 0,
        grid: str | None = None,
        gaussian_std: float = 5.0,
    ):
        self.gaussian_std = gaussian_std  # validated by check_options in the base constructor
        super().__init__(model, pretrained, templates, cache_dir, quick_gelu, text_batch_size, seed, grid)

    def check_options(self) -> None:
        super().check_options()
        self.gaussian_std = number(self.gaussian_std, "gaussian_std", self.stage_name, above=0.0)
        self.last_block = self._last_block()

    def _last_block(self) -> LastBlock:
        base = LAST_BLOCKS["naclip"]
        return LastBlock(base.name, partial(naclip_block, std=self.gaussian_std), base.pos_interp, base.pos_by_count)
