"""What the VFM-guided predictors share: their base class, the mmseg input normalisation, building the vision
model they own, and a DINO forward in the DINO repository's own operation order.

Both reference repositories (mc-lan/ProxyCLIP e7b767f, MICV-yonsei/CASS 228ecdd) feed CLIP the output of
mmseg's `SegDataPreProcessor` with CLIP's statistics written on the 0-255 scale and rounded to three decimals,
`(x - [122.771, 116.746, 104.094]) / [68.501, 66.632, 70.323]`; the vision foundation model (VFM) input is
derived from that tensor. The rounded constants move thresholded steps (ProxyCLIP's mask, CASS's fp16 graph)
measurably, so they are used here, on the exact 8-bit values (`images * 255` recovers them exactly for the
pipeline's images, which are uint8 / 255).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, ClassVar, Iterator, Mapping

import torch
from torch import nn

from ovseg.errors import ConfigError, PluginError, WeightsError
from ovseg_clip.dense import LastBlock, clip_block
from ovseg_clip.predictors import ClipDensePredictor

__all__ = ["MMSEG_CLIP_MEAN", "MMSEG_CLIP_STD", "mmseg_normalize", "build_vfm", "VFMGuidedPredictor", "vfm_tokens",
           "dino_order_blocks", "standard_mha"]

#: CLIP's mean / std x 255, rounded as in the authors' `SegDataPreProcessor(mean=..., std=...)`
MMSEG_CLIP_MEAN = (122.771, 116.746, 104.094)
MMSEG_CLIP_STD = (68.501, 66.632, 70.323)


def mmseg_normalize(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] -> `(255 x - mean) / std` with the constants above, float32."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    x = images.float() * 255
    mean = torch.tensor(MMSEG_CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(MMSEG_CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def build_vfm(vfm: Mapping[str, Any] | None, owner: str, defaults: Mapping[str, Any]) -> nn.Module:
    """The vision model a predictor owns: `build_extractor(**vfm)` with the predictor's defaults filled in.

    Refuses, naming the option, a `vfm` that is not a mapping, a name that is not a registered extractor,
    and extractors that cannot be run token by token (no timm ViT behind `encode`).
    """
    from ovseg.pipeline.factory import build_extractor
    from ovseg.registry import list_plugins

    if vfm is not None and not isinstance(vfm, Mapping):
        raise ConfigError(f"{owner}: vfm must be a mapping such as {{name: dino, model: ...}}, got {vfm!r}")
    cfg = {**defaults, **dict(vfm or {})}
    name = cfg.pop("name", None)
    registered = sorted(p.name for p in list_plugins("extractor")["extractor"])
    if name not in registered:
        raise ConfigError(
            f"{owner}: vfm.name {name!r} is not a registered feature extractor; registered: {', '.join(registered)}"
        )
    try:
        extractor = build_extractor(name, **cfg)
    except PluginError as exc:
        raise ConfigError(f"{owner}: vfm {dict(name=name, **cfg)} cannot be built: {exc}") from exc
    except WeightsError as exc:  # the extractor's message names its own option; here it is the predictor's vfm
        raise WeightsError(f"{owner} vfm: " + str(exc).replace("extractor.pretrained", "predictor.vfm.pretrained")) from exc
    vit = getattr(extractor, "vit", None)
    if not callable(getattr(extractor, "encode", None)) or vit is None or not hasattr(vit, "blocks"):
        raise ConfigError(
            f"{owner}: vfm.name {name!r} builds {type(extractor).__name__}, which has no ViT to run token by token; "
            "use a DINO or DINOv2 extractor (name: dino or dinov2)"
        )
    return extractor


class VFMGuidedPredictor(ClipDensePredictor):
    """A dense CLIP predictor (weights, text embeddings: `ClipDensePredictor`) that owns a VFM, `self.vfm`, and
    replaces CLIP's last block with its own attention; subclasses set `default_vfm` (their authors' VFM)."""

    default_vfm: ClassVar[dict] = {}

    def _build_vfm(self, vfm: Mapping[str, Any] | None) -> None:
        self.vfm = build_vfm(vfm, self.stage_name, {**self.default_vfm, "normalize": False})

    def _last_block(self) -> LastBlock:
        # only the positional-embedding rule is used: DINO-style, as both authors' `interpolate_pos_encoding`
        return LastBlock(self.method, clip_block, "dino", pos_by_count=True)  # as their authors' code: by token count

    def extra_repr(self) -> str:
        return super().extra_repr() + f", vfm={self.vfm.model_name!r}"


def _dino_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm `Attention` computed as facebookresearch/dino's `Attention.forward`: `softmax((q kᵀ) * scale) v`.

    timm scales q before the product (or fuses the whole attention); the results differ by rounding only,
    which CASS's fp16 graph turns into visible differences, so the DINO order is kept.
    """
    b, n, c = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    weights = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, c)
    return attn.proj(attn.norm(out) if hasattr(attn, "norm") else out)


def dino_order_blocks(blocks, tokens: torch.Tensor) -> torch.Tensor:
    """Run timm ViT blocks (pre-norm, optional layer scale) with DINO's attention order (see above)."""
    for blk in blocks:
        tokens = tokens + blk.ls1(_dino_attention(blk.attn, blk.norm1(tokens)))
        tokens = tokens + blk.ls2(blk.mlp(blk.norm2(tokens)))
    return tokens


def vfm_tokens(extractor: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Raw patch tokens (B, h·w, C) of the extractor's `feature` for normalised input x (a patch multiple).

    `feature` "x" is the last block's output after the final norm, "q"/"k"/"v" the last block's qkv Linear
    on its normed input. DINO v1 runs in the DINO repository's operation order (both authors load it from
    facebookresearch/dino code); other families through the extractor's own `encode`.
    """
    from ovseg_dino.extractors import DINOExtractor

    if not isinstance(extractor, DINOExtractor):
        return extractor.encode(x)
    vit = extractor.vit
    tokens = extractor._tokens(x)
    if extractor.feature == "x":
        out = vit.norm(dino_order_blocks(vit.blocks, tokens))
    else:
        last = vit.blocks[-1]
        qkv = last.attn.qkv(last.norm1(dino_order_blocks(vit.blocks[:-1], tokens)))
        c = qkv.shape[-1] // 3
        i = "qkv".index(extractor.feature)
        out = qkv[..., i * c : (i + 1) * c]
    return out[:, vit.num_prefix_tokens :]


@contextmanager
def standard_mha() -> Iterator[None]:
    """Run `nn.MultiheadAttention` through its standard path, as the authors' seq-first OpenAI blocks do.

    open_clip's batch-first blocks would otherwise take PyTorch's fused inference path, whose rounding
    differs; CASS's fp16 key graph makes such differences visible (1e-4 in the probabilities).
    """
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
