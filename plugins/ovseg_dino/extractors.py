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
from ovseg.pipeline.stages import IMAGENET_MEAN, IMAGENET_STD, FeatureExtractor, module_dtype, prepare_images

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
    """

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
    ):
        super().__init__()
        import timm

        name = model or self.default_model
        if feature not in FEATURES:
            raise ConfigError(f"feature must be one of {FEATURES}, got {feature!r}")
        pos_interpolation = pos_interpolation or self.default_pos_interpolation
        if pos_interpolation not in POS_INTERPOLATIONS:
            raise ConfigError(f"pos_interpolation must be one of {POS_INTERPOLATIONS}, got {pos_interpolation!r}")
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
        self.model_name, self.feature, self.pos_interpolation = name, feature, pos_interpolation
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.dim = int(vit.embed_dim)

    def extra_repr(self) -> str:
        return (
            f"model={self.model_name!r}, feature={self.feature!r}, random_weights={self.random_weights}, "
            f"pos_interpolation={self.pos_interpolation!r}"
        )

    def _patch_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Positional embeddings of an h×w patch grid, (1, h·w, C)."""
        vit = self.vit
        pos = vit.pos_embed
        start = 0 if vit.no_embed_class else vit.num_prefix_tokens
        gh, gw = vit.patch_embed.grid_size
        if (h, w) == (gh, gw):
            return pos[:, start:]
        grid = pos[:, start:].float().reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        if self.pos_interpolation == "dino":  # DINO's interpolate_pos_encoding
            grid = F.interpolate(grid, scale_factor=((h + 0.1) / gh, (w + 0.1) / gw), mode="bicubic", align_corners=False)
        else:  # timm.layers.resample_abs_pos_embed == DINOv2-reg (size, antialias)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        if grid.shape[-2:] != (h, w):
            raise RuntimeError(f"positional embedding resized to {tuple(grid.shape[-2:])}, expected {(h, w)}")
        return grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(pos.dtype)

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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised features (B, D, ceil(H/p), ceil(W/p)) of float images (B, 3, H, W) in [0, 1]."""
        vit = self.vit
        x = prepare_images(images, IMAGENET_MEAN, IMAGENET_STD, self.patch_size, dtype=module_dtype(vit))
        b, h, w = x.shape[0], x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
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
        out = out[:, vit.num_prefix_tokens :]
        out = F.normalize(out.float(), dim=-1).to(out.dtype)
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
