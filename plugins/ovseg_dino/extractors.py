"""DINO and DINOv2 patch-feature extractors on timm ViTs: the last block's q, k or v, or its output.

LPOSS uses the *values* of the last block of DINO ViT-B/16 (`feature="v"`): the output of
`blocks[-1].attn.qkv` (bias included) for the patch tokens, heads concatenated head-major, CLS and
register tokens dropped, L2-normalised. We run the ViT up to that Linear and stop, so the rest of
the last block is never computed. Positional embeddings are interpolated for any grid, the way the
original code of each model family does it (DINO: bicubic with DINO's +0.1 scale factor; DINOv2 with
registers: bicubic to the exact size with antialiasing, as timm does).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ovseg.errors import ConfigError
from ovseg.pipeline.options import boolean, choice
from ovseg.pipeline.patches import IMAGENET_MEAN, IMAGENET_STD, prepare_images, resample_pos_embed
from ovseg.pipeline.stages import FeatureExtractor
from ovseg.runtime import module_dtype

from . import weights

FEATURES = ("q", "k", "v", "x")
POS_INTERPOLATIONS = ("dino", "timm")
_RANDOM_SEED = 0


class TimmViTExtractor(FeatureExtractor):
    """Dense features of a timm VisionTransformer (see module doc); subclasses fix the model family.

    Args:
        model: timm name, `arch` or `arch.tag` (e.g. `vit_base_patch16_224.dino`).
        pretrained: True (the hub weights of the name's tag, or the family's default tag), a timm tag,
            a local checkpoint path, or "random" (seeded random initialisation, for tests).
        feature: "q", "k" or "v" of the last block's qkv Linear, or "x" (the last block's output after
            the final norm).
        model_kwargs: extra `timm.create_model` arguments (e.g. `{depth: 2}` for tiny test models).
        pos_interpolation: "dino" or "timm" (see module doc); the family's choice by default.
        normalize: L2-normalise each patch feature (False: the raw features, e.g. CASS's keys).
    """

    options = ("feature", "normalize", "pos_interpolation")

    default_model: str = ""
    default_tag: str = ""
    default_pos_interpolation: str = "timm"

    def __init__(
        self,
        model: str | None = None,
        pretrained: Any = True,
        feature: str = "v",
        model_kwargs: dict | None = None,
        pos_interpolation: str | None = None,
        normalize: bool = True,
    ):
        super().__init__()
        import timm

        name = model or self.default_model
        self.configure(feature=feature, normalize=normalize,
                       pos_interpolation=pos_interpolation or self.default_pos_interpolation)
        arch, _, tag = name.partition(".")
        # find the weights first, so a missing checkpoint fails before a large model is built
        self.random_weights = pretrained in (weights.RANDOM, False, None)
        path = None
        if not self.random_weights:
            if isinstance(pretrained, str) and weights.looks_like_path(pretrained):
                path = weights.local_file(pretrained)
            else:
                hub = weights.hub_name(arch, tag, pretrained, self.default_tag)
                path = weights.resolve_hub_file(hub)
        kwargs = dict(model_kwargs or {})
        kwargs.update(num_classes=0, dynamic_img_size=True)
        try:
            with torch.random.fork_rng(devices=[]):  # random weights are reproducible across runs
                torch.manual_seed(_RANDOM_SEED)
                vit = timm.create_model(arch, pretrained=False, **kwargs)
        except Exception as exc:  # noqa: BLE001 - unknown names and bad kwargs
            raise ConfigError(f"cannot build timm model {arch!r} with {kwargs}: {type(exc).__name__}: {exc}") from exc
        last = vit.blocks[-1] if hasattr(vit, "blocks") and len(vit.blocks) else None
        if last is None or not isinstance(getattr(getattr(last, "attn", None), "qkv", None), torch.nn.Linear):
            raise ConfigError(f"timm model {arch!r} is not a ViT whose last block has a fused qkv Linear")

        if path is not None:
            weights.load_into(vit, path, f"timm model {arch!r}")
        self.vit = vit.eval().requires_grad_(False)
        self.model_name = name
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.dim = int(vit.embed_dim)

    def check_options(self) -> None:
        self.feature = choice(self.feature, "feature", FEATURES, self.stage_name)
        self.normalize = boolean(self.normalize, "normalize", self.stage_name)
        self.pos_interpolation = choice(self.pos_interpolation, "pos_interpolation", POS_INTERPOLATIONS, self.stage_name)

    def extra_repr(self) -> str:
        return f"model={self.model_name!r}, " + super().extra_repr()

    def _patch_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Positional embeddings of an h×w patch grid, (1, h·w, C), resampled as the family's code does."""
        vit = self.vit
        start = 0 if vit.no_embed_class else vit.num_prefix_tokens
        grid0 = tuple(vit.patch_embed.grid_size)
        return resample_pos_embed(vit.pos_embed[:, start:], grid0, (h, w), self.pos_interpolation, prefix=0)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding + prefix tokens + positional embeddings, as timm's `_pos_embed` does."""
        vit = self.vit
        b = x.shape[0]
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = vit.patch_embed(x).reshape(b, h * w, -1)
        prefix = [t.expand(b, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        pos = self._patch_pos_embed(h, w)
        if vit.no_embed_class:
            tokens = torch.cat(prefix + [tokens + pos], dim=1)
        else:
            pos = torch.cat([vit.pos_embed[:, : vit.num_prefix_tokens], pos], dim=1)
            tokens = torch.cat(prefix + [tokens], dim=1) + pos
        return vit.norm_pre(vit.patch_drop(vit.pos_drop(tokens)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Patch features (B, h·w, D) of images already normalised and a multiple of the patch size.

        The entry point for predictors that own a vision model and prepare its input themselves; no
        L2 normalisation, prefix tokens dropped, in the weights' dtype.
        """
        vit = self.vit
        tokens = self._tokens(x)
        for block in vit.blocks[:-1]:
            tokens = block(tokens)
        last = vit.blocks[-1]
        if self.feature == "x":
            out = vit.norm(last(tokens))
        else:
            qkv = last.attn.qkv(last.norm1(tokens))  # (B, T, 3·C) laid out (3, heads, head_dim)
            c = qkv.shape[-1] // 3
            i = "qkv".index(self.feature)
            out = qkv[..., i * c : (i + 1) * c]
        return out[:, vit.num_prefix_tokens :]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features (B, D, ceil(H/p), ceil(W/p)), float32, of float images (B, 3, H, W) in [0, 1]: ImageNet
        normalisation, zero padding to the patch grid, L2-normalised per patch unless `normalize` is False."""
        x = prepare_images(images, IMAGENET_MEAN, IMAGENET_STD, self.patch_size, dtype=module_dtype(self.vit))
        b, h, w = x.shape[0], x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        out = self.encode(x).float()
        if self.normalize:
            out = F.normalize(out, dim=-1)
        return out.transpose(1, 2).reshape(b, -1, h, w)


class DINOExtractor(TimmViTExtractor):
    """DINO v1 ViT (timm `vit_base_patch16_224.dino`, `vit_small_patch16_224.dino`, `..._patch8_224.dino`)."""

    default_model = "vit_base_patch16_224.dino"
    default_tag = "dino"
    default_pos_interpolation = "dino"


class DINOv2Extractor(TimmViTExtractor):
    """DINOv2 ViT, by default with registers (timm `vit_{small,base,large}_patch14_reg4_dinov2.lvd142m`)."""

    default_model = "vit_base_patch14_reg4_dinov2.lvd142m"
    default_tag = "lvd142m"
    default_pos_interpolation = "timm"
