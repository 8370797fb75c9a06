"""ProxyCLIP (Lan et al., ECCV'24): CLIP's last block attends with a vision foundation model's patch similarities.

As the authors' code runs it (mc-lan/ProxyCLIP e7b767f, `proxyclip_segmentor.py` `forward_feature` /
`forward_slide` / `compute_padsize`, vendored `open_clip/transformer.py` `VisionTransformer.forward` /
`custom_attn`), for each window:

1. the window is normalised with mmseg's rounded CLIP statistics and zero-padded, centred, to a multiple of
   `pad_multiple` (56): `pad = 56 - L mod 56`, `pad // 2` before, the rest after;
2. the VFM (default DINO ViT-B/8) sees that tensor un-normalised with the exact CLIP statistics and
   re-normalised with ImageNet's (padding thus reaches it as the CLIP-mean colour); its features `f` are the
   last block's output after the final norm, on the grid I×J = H/8 × W/8;
3. CLIP runs blocks 0..L-2 unchanged on the ⌊H/16⌋×⌊W/16⌋ grid (no padding to 16); in the last block only the
   values `v` of ln_1(x) are used, class token dropped, resized bilinearly to I×J;
4. `S = f̂ᵀf̂` (f̂: f L2-normalised per patch), `S' = γ (S − β·mean(S))` with one mean per window, entries
   `S' < 0` masked, `A = softmax(S')` for every head, `y = out_proj(A v)`: no residual, no FFN, no class token;
5. `ln_post`, `proj`, L2 normalisation, cosine with the text embeddings: (Q, I, J) on the VFM grid.

Windows that were padded are upsampled to the padded size and cropped back (pixel resolution, as
`forward_slide` does); others are returned on the VFM grid (the segmenter's merge does the same upsampling).
Two corrections of the authors' code, identical on their square windows: the grid is I = H/8, J = W/8 and v is
laid out as (H/16, W/16) (the code takes both sides from the height, which scrambles non-square inputs), and a
window whose similarities are all below `β·mean` keeps each patch's similarity to itself instead of turning
into NaN (a warning says when that happens).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ovseg.errors import ConfigError
from ovseg.pipeline.options import choice, integer, number
from ovseg.pipeline.patches import (
    GRID_POLICIES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    grid_layout,
    to_window,
)
from ovseg.runtime import module_dtype
from ovseg_clip.dense import _heads, _out, cosine_scores, project, trunk

from .common import VFMGuidedPredictor, mmseg_normalize, standard_mha, vfm_tokens

__all__ = ["ProxyCLIPPredictor", "proxy_attention", "proxy_weights"]


def proxy_weights(features: torch.Tensor, beta: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Proxy attention weights (B, N, N) from VFM features (B, C, N), and which windows were degenerate (B,).

    `S = f̂ᵀf̂`, `S' = γ (S − β·mean(S))` with the mean over each window's whole matrix, `S' < 0` masked,
    row softmax; computed in float32 (also under autocast). A row with every entry masked (only when β·mean(S) > max S) keeps its
    diagonal, where the authors' code would give NaN.
    """
    with torch.autocast(features.device.type, enabled=False):  # a mixed-precision run must not cast S
        f = F.normalize(features.float(), dim=1)
        sim = torch.einsum("b c m, b c n -> b m n", f, f)
    # one mean per window, each over its whole matrix as the authors' `torch.mean(similarity)` (batch 1)
    mean = torch.stack([s.mean() for s in sim]).view(-1, 1, 1)
    sim = (sim - mean * beta) * gamma
    masked = sim < 0.0
    empty = masked.all(dim=-1)  # (B, N) rows with nothing left
    degenerate = empty.any(dim=-1)
    if bool(degenerate.any()):
        eye = torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
        masked = masked & ~(eye & empty[:, :, None])
    return torch.softmax(sim.masked_fill(masked, float("-inf")), dim=-1), degenerate


def proxy_attention(
    block: torch.nn.Module,
    tokens: torch.Tensor,
    grid: tuple[int, int],
    weights: torch.Tensor,
    vfm_grid: tuple[int, int],
) -> torch.Tensor:
    """ProxyCLIP's last block: `out_proj(A · resize(v))` for tokens (B, 1 + h·w, D) -> (B, I·J, D).

    `weights` (B, I·J, I·J) serve every head; v is the values of ln_1(tokens) without the class token, laid out
    on the CLIP grid `grid` and resized bilinearly (align_corners=False) to `vfm_grid`. No residual, no FFN.
    """
    _, _, v = _heads(block, tokens)  # (B, heads, 1 + h·w, hd)
    b, heads, _, hd = v.shape
    v = v[:, :, 1:].reshape(b * heads, grid[0], grid[1], hd).permute(0, 3, 1, 2)
    v = F.interpolate(v, size=vfm_grid, mode="bilinear", align_corners=False)
    v = v.permute(0, 2, 3, 1).reshape(b, heads, vfm_grid[0] * vfm_grid[1], hd)
    out = weights.to(v.dtype)[:, None] @ v  # (B, heads, I·J, hd)
    return _out(block, out)


class ProxyCLIPPredictor(VFMGuidedPredictor):
    """ProxyCLIP: CLIP's last block attends with a VFM's patch similarities (see the module docstring).

    Args (besides `ClipDensePredictor`'s model, pretrained, templates, cache_dir, quick_gelu, text_batch_size,
    seed):
        vfm: the vision model, built with `build_extractor(**vfm)`; default `{name: dino, model:
            vit_base_patch8_224.dino, feature: x}` (the authors' `torch.hub` `dino_vitb8`). Its patch size must
            divide the padded window.
        beta, gamma: the mask threshold β·mean(S) and the sharpening γ (1.2 and 3.0; the paper finds results
            stable for β in [1.0, 1.6] and γ in [2, 5]); β ≥ 0, γ > 0.
        pad_multiple: windows are padded to a multiple of this (56 in the authors' code).
        grid: how a window is fitted to `pad_multiple`: `center` (the authors'), `pad` or `floor`.

    Output: float32 cosines (B, Q, H/p, W/p) on the VFM grid (p its patch size), or (B, Q, H, W) for windows
    that needed padding. `patch_size` is the VFM's. The proxy similarities, mask and softmax are float32
    whatever the weights' dtype (the authors' fp16 run computes them in fp16).
    """

    method = "proxyclip"
    grid = "center"
    default_vfm = {"name": "dino", "model": "vit_base_patch8_224.dino", "feature": "x"}
    options = ("grid", "beta", "gamma", "pad_multiple")

    def __init__(
        self,
        model: str = "ViT-B-16",
        pretrained: str = "openai",
        templates: str = "imagenet80",
        vfm: dict | None = None,
        beta: float = 1.2,
        gamma: float = 3.0,
        pad_multiple: int = 56,
        cache_dir: str | None = None,
        quick_gelu: bool | None = None,
        text_batch_size: int = 256,
        seed: int = 0,
        grid: str | None = None,
    ):
        self.beta, self.gamma, self.pad_multiple = beta, gamma, pad_multiple  # checked by check_options
        super().__init__(model, pretrained, templates, cache_dir, quick_gelu, text_batch_size, seed, grid)
        self._build_vfm(vfm)
        self.patch_size = int(self.vfm.patch_size)
        self._warned = False

    def check_options(self) -> None:
        owner = self.stage_name
        self.grid = choice(self.grid, "grid", GRID_POLICIES, owner)
        self.beta = number(self.beta, "beta", owner, minimum=0.0)
        self.gamma = number(self.gamma, "gamma", owner, above=0.0)
        self.pad_multiple = integer(self.pad_multiple, "pad_multiple", owner, minimum=1)

    def _vfm_input(self, x: torch.Tensor) -> torch.Tensor:
        """The CLIP input un-normalised with the exact CLIP statistics, then normalised with ImageNet's."""
        def stats(values):
            return torch.tensor(values, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)

        y = x * stats(OPENAI_CLIP_STD) + stats(OPENAI_CLIP_MEAN)
        return (y - stats(IMAGENET_MEAN)) / stats(IMAGENET_STD)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 proxy features (B, I, J, E) on the VFM grid of the padded windows."""
        layout = grid_layout(images.shape[-2], images.shape[-1], self.pad_multiple, self.grid)
        x = mmseg_normalize(images)[..., : layout.kept[0], : layout.kept[1]]
        if any(layout.pad):
            x = F.pad(x, layout.pad)
        height, width = layout.padded
        p = self.patch_size
        if height % p or width % p:
            raise ConfigError(
                f"{self.stage_name}: the VFM's patch size {p} (vfm.model {self.vfm.model_name!r}) does not divide the "
                f"{height}x{width} window (a {images.shape[-2]}x{images.shape[-1]} crop fitted to pad_multiple="
                f"{self.pad_multiple}); use a crop and pad_multiple that are multiples of {p}, or another VFM"
            )
        vfm_grid = (height // p, width // p)
        feats = vfm_tokens(self.vfm, self._vfm_input(x).to(module_dtype(self.vfm)))  # (B, I·J, C)
        weights, degenerate = proxy_weights(feats.transpose(1, 2), self.beta, self.gamma)
        if bool(degenerate.any()) and not self._warned:
            self._warned = True
            warnings.warn(
                f"{self.stage_name}: in {int(degenerate.sum())} window(s) every proxy similarity is below "
                f"beta * mean (beta={self.beta}); each patch keeps its similarity to itself there (the authors' "
                "code gives NaN). Said once per predictor.",
                RuntimeWarning,
                stacklevel=2,
            )
        visual = self.clip.visual
        with standard_mha():
            tokens, grid = trunk(visual, x.to(module_dtype(self.clip)), self.last_block.pos_interp,
                                 pos_by_count=self.last_block.pos_by_count)
            out = proxy_attention(visual.transformer.resblocks[-1], tokens, grid, weights, vfm_grid)
        return project(visual, out).view(x.shape[0], vfm_grid[0], vfm_grid[1], -1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Cosines (B, Q, I, J) on the VFM grid, or (B, Q, H, W) for windows that needed padding."""
        text = self.text_embeddings
        feats = self.features(images)
        if text.device != feats.device:
            self._text = text = text.to(feats.device)
        layout = grid_layout(images.shape[-2], images.shape[-1], self.pad_multiple, self.grid)
        return to_window(cosine_scores(feats, text), layout)
