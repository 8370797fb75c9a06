"""CASS (Kim et al., CVPR'25): CLIP's last block attends with a key graph distilled from a VFM's, plus an
object-presence prompt and a whole-image term.

As the authors' code runs it (MICV-yonsei/CASS 228ecdd: `clip/model.py` `VisionTransformer.forward` /
`custom_attn`, `cass_segmentor.py` `forward_feature` / `forward_slide` / `hierarchical_prompt`,
`dino/dino_attention.py` `DinoSelfAttention.forward`), for each window (the `floor` grid: the stride-16
convolution drops a remainder, nothing is padded):

1. CLIP input: mmseg's rounded CLIP statistics on the 8-bit values. VFM input, from that tensor: "un-normalised"
   with ImageNet statistics and the authors' typo (std 0.255 for blue), ×255, truncated to uint8 (so the VFM
   sees a contrast-changed picture), resized by Pillow (bicubic) to s×s with s the window's short side (a no-op
   for square windows), ImageNet-normalised, cropped top-left to a multiple of the VFM's patch;
2. the VFM's raw last-block keys (DINO's operation order), cast to float16 as the authors do, laid out with
   CLIP's heads and head size, resized bilinearly to CLIP's grid and mapped onto the range of CLIP's keys;
3. CLIP blocks 0..L-2 unchanged; the last block's keys give CLIP's graph, the VFM keys the other; the
   spectral distillation of `ovseg_vfm.spectral` mixes them per head; NACLIP's Gaussian bias (std
   `gaussian_std` patches) is added, softmax, `· v`, `out_proj`; no residual, no FFN; `ln_post`, `proj` → F;
4. the global vector g: the unchanged CLIP's class token of the whole resized image (`set_image`), or of the
   window itself for `dataset: city_scapes` (and when no image was set); p = ĝ · Tᵀ;
5. the object-presence prompt adjusts one text embedding per name cluster (`ovseg_vfm.prompts`), and the
   window's scores are `(F̂ · T'ᵀ)(1 − γ) + p γ` with γ = `global_semantics_weight`: (Q, h, w), no softmax.

`dataset` takes the authors' configuration keys; `voc20` and `city_scapes` switch the singular-value stretch
off, `city_scapes` takes g from each window. The float16 steps (VFM keys and their graph) are kept whatever the
run's precision, because the authors cast them explicitly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.errors import ConfigError
from ovseg.pipeline.options import choice, integer, number
from ovseg.pipeline.patches import IMAGENET_MEAN, IMAGENET_STD, grid_layout
from ovseg.pipeline.vocabulary import Vocabulary
from ovseg.runtime import module_dtype
from ovseg_clip.dense import _run_block, neighbourhood_bias, project, trunk

from .common import VFMGuidedPredictor, mmseg_normalize, standard_mha, vfm_tokens
from .prompts import adjusted_text, cluster_names
from .spectral import distilled_graph, match_key_range

__all__ = ["CASSPredictor", "DATASET_KEYS"]

#: the authors' configuration keys (`configs/cfg_<key>.py`, matched by `re.search(r'cfg_(\w+)\.py')`)
DATASET_KEYS = ("voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff164k", "city_scapes", "ade20k")
#: `_scale_singular_values` leaves the singular values alone for these
NO_EIGEN_SCALING = ("voc20", "city_scapes")
#: `forward_slide` takes the global vector from each crop for these
CROP_GLOBAL = ("city_scapes",)
# the authors' `inv_normalize`: ImageNet statistics with 0.255 for blue (a typo the VFM input depends on)
_INV_MEAN = (-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.255)
_INV_STD = (1 / 0.229, 1 / 0.224, 1 / 0.255)


def _stats(values, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device).view(1, 3, 1, 1)


def vfm_input(x: torch.Tensor, patch: int) -> torch.Tensor:
    """CASS's VFM input (B, 3, s', s') float32 from CLIP-normalised windows x (B, 3, H, W); see step 1 above."""
    y = (x - _stats(_INV_MEAN, x)) / _stats(_INV_STD, x)
    pixels = (y * 255).clamp(0, 255).to(torch.uint8)  # truncation, as numpy's astype('uint8')
    height, width = pixels.shape[-2:]
    side = min(height, width)
    if height != width:  # Pillow's default resize (bicubic, antialiased) to side x side, as the authors
        from PIL import Image

        arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()
        squares = [np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((side, side))) for a in arrays]
        # contiguous NCHW as torchvision's ToTensor: a channels-last input takes another convolution kernel
        pixels = torch.from_numpy(np.stack(squares)).permute(0, 3, 1, 2).contiguous().to(x.device)
    z = (pixels.float().div(255) - _stats(IMAGENET_MEAN, x)) / _stats(IMAGENET_STD, x)
    keep = side - side % patch
    return z[..., :keep, :keep]


class CASSPredictor(VFMGuidedPredictor):
    """CASS: spectral VFM-graph distillation in CLIP's last block (see the module docstring).

    Args (besides `ClipDensePredictor`'s model, pretrained, templates, cache_dir, quick_gelu, text_batch_size,
    seed):
        vfm: the vision model, built with `build_extractor(**vfm)`; default `{name: dino, model:
            vit_base_patch8_224.dino, feature: k}`; its raw keys are read, so its width must equal CLIP's.
        dataset: the authors' configuration key (`DATASET_KEYS`), which selects the singular-value stretch
            and where the global vector comes from.
        global_semantics_weight (γ), mean_vector_weight (α), h_threshold: the per-dataset weights of
            the authors' configs (their constructor's default is 0 for all three).
        gaussian_std: the neighbourhood bias's standard deviation in patches (5).
        svd_seed: seed of each randomized SVD's start matrix (drawn afresh for every window and head).
        grid: `floor` only (the authors' patch grid).

    Output: float32 fused scores (B, Q, ⌊H/16⌋, ⌊W/16⌋).
    """

    method = "cass"
    grid = "floor"
    default_vfm = {"name": "dino", "model": "vit_base_patch8_224.dino", "feature": "k"}
    options = ("grid", "dataset", "global_semantics_weight", "mean_vector_weight", "h_threshold", "gaussian_std",
               "svd_seed")

    def __init__(
        self,
        model: str = "ViT-B-16",
        pretrained: str = "openai",
        templates: str = "imagenet80",
        vfm: dict | None = None,
        dataset: str = "voc20",
        global_semantics_weight: float = 0.0,
        mean_vector_weight: float = 0.0,
        h_threshold: float = 0.0,
        gaussian_std: float = 5.0,
        svd_seed: int = 42,
        cache_dir: str | None = None,
        quick_gelu: bool | None = None,
        text_batch_size: int = 256,
        seed: int = 0,
        grid: str | None = None,
    ):
        # checked by check_options in the base constructor
        self.dataset, self.global_semantics_weight, self.mean_vector_weight = dataset, global_semantics_weight, mean_vector_weight
        self.h_threshold, self.gaussian_std, self.svd_seed = h_threshold, gaussian_std, svd_seed
        super().__init__(model, pretrained, templates, cache_dir, quick_gelu, text_batch_size, seed, grid)
        self._build_vfm(vfm)
        if self.vfm.feature != "k":
            raise ConfigError(f"{self.stage_name}: vfm.feature must be 'k' (CASS distils the VFM's key graph), "
                              f"got {self.vfm.feature!r}")
        width, vfm_width = self.clip.visual.transformer.width, int(self.vfm.dim)
        if width != vfm_width:
            raise ConfigError(
                f"{self.stage_name}: vfm.model {self.vfm.model_name!r} has width {vfm_width} but the CLIP image tower "
                f"has {width}; CASS lays the VFM keys out with CLIP's heads, so the widths must be equal"
            )
        self._image: torch.Tensor | None = None
        self._global: torch.Tensor | None = None
        self._clusters: tuple[tuple, torch.Tensor] | None = None

    def check_options(self) -> None:
        owner = self.stage_name
        self.grid = choice(self.grid, "grid", ("floor",), owner)
        self.dataset = choice(self.dataset, "dataset", DATASET_KEYS, owner)
        self.global_semantics_weight = number(self.global_semantics_weight, "global_semantics_weight", owner,
                                              minimum=0.0, maximum=1.0)
        self.mean_vector_weight = number(self.mean_vector_weight, "mean_vector_weight", owner, minimum=0.0, maximum=1.0)
        self.h_threshold = number(self.h_threshold, "h_threshold", owner, minimum=0.0)
        self.gaussian_std = number(self.gaussian_std, "gaussian_std", owner, above=0.0)
        self.svd_seed = integer(self.svd_seed, "svd_seed", owner, minimum=0)

    # -- text -------------------------------------------------------------------------------

    def set_classes(self, vocabulary: Vocabulary | list) -> None:
        super().set_classes(vocabulary)
        self._clusters = None

    def clusters(self) -> torch.Tensor:
        """Cluster id (Q,) of each name of the vocabulary at the current `h_threshold`."""
        text = self.text_embeddings
        key = (id(text), self.h_threshold)
        if self._clusters is None or self._clusters[0] != key:
            self._clusters = (key, cluster_names(text, self.h_threshold))
        return self._clusters[1]

    # -- images -----------------------------------------------------------------------------

    def _clip_input(self, images: torch.Tensor) -> torch.Tensor:
        return mmseg_normalize(images).to(module_dtype(self.clip))

    def _class_token(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unit global vectors (B, E): the unchanged last block, class token, ln_post, proj."""
        visual = self.clip.visual
        out = _run_block(visual.transformer, visual.transformer.resblocks[-1], tokens)
        return project(visual, out[:, :1])[:, 0]

    def set_image(self, image: torch.Tensor | None) -> None:
        """The resized image (3, H, W) whose global vector the windows that follow use (None forgets it); the
        vector is computed when a window first needs it (never for `city_scapes`)."""
        self._image, self._global = image, None

    @torch.no_grad()
    def _image_global(self) -> torch.Tensor | None:
        if self._global is None and self._image is not None:
            with standard_mha():
                tokens, _ = trunk(self.clip.visual, self._clip_input(self._image[None]), self.last_block.pos_interp,
                                  pos_by_count=self.last_block.pos_by_count)
                self._global = self._class_token(tokens)
        return self._global

    def _vfm_keys(self, x: torch.Tensor, heads: int, grid: tuple[int, int]) -> torch.Tensor:
        """The VFM's raw keys, float16, as (B, heads, h·w, head_dim) on CLIP's grid (step 2)."""
        z = vfm_input(x, self.vfm.patch_size)
        keys = vfm_tokens(self.vfm, z.to(module_dtype(self.vfm))).half()  # (B, I·J, C)
        b, c = keys.shape[0], keys.shape[-1]
        side = z.shape[-1] // self.vfm.patch_size
        keys = keys.transpose(1, 2).reshape(b * heads, c // heads, side, side)
        keys = F.interpolate(keys, size=grid, mode="bilinear", align_corners=False)
        return keys.reshape(b, heads, c // heads, grid[0] * grid[1]).transpose(2, 3)

    def _cass_block(self, tokens: torch.Tensor, grid: tuple[int, int], x: torch.Tensor) -> torch.Tensor:
        """CASS's last block on tokens (B, 1 + h·w, D): (B, h·w, D), laid out seq-first as the authors' code."""
        block = self.clip.visual.transformer.resblocks[-1]
        attn = block.attn
        h = block.ln_1(tokens).transpose(0, 1)  # (1 + N, B, D)
        n, b, d = h.shape
        heads = attn.num_heads
        hd = d // heads
        scale = hd**-0.5
        _, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        k = k.contiguous().view(n, b * heads, hd).transpose(0, 1)[:, 1:]  # (B·heads, N, hd)
        v = v.contiguous().view(n, b * heads, hd).transpose(0, 1)[:, 1:]
        vfm = self._vfm_keys(x, heads, grid)
        # the graphs keep the authors' dtypes (CLIP's, and float16 for the VFM's) even under autocast
        with torch.autocast(x.device.type, enabled=False):
            vfm = match_key_range(vfm, k.reshape(b, heads, n - 1, hd)).reshape(b * heads, n - 1, hd)
            clip_graph = torch.bmm(k, k.transpose(1, 2)) * scale
            vfm_graph = torch.bmm(vfm, vfm.transpose(1, 2)) * scale
            logits = distilled_graph(
                vfm_graph.view(b, heads, n - 1, n - 1),
                clip_graph.view(b, heads, n - 1, n - 1),
                eigen_scaling=self.dataset not in NO_EIGEN_SCALING,
                seed=self.svd_seed,
            ).view(b * heads, n - 1, n - 1)
        bias = neighbourhood_bias(grid, self.gaussian_std, logits.device, logits.dtype)[1:, 1:]
        weights = torch.softmax(logits + bias, dim=-1)
        out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(n - 1, b, d)
        return attn.out_proj(out).transpose(0, 1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Fused scores (B, Q, ⌊H/16⌋, ⌊W/16⌋), float32, of windows (B, 3, H, W) in [0, 1]."""
        text = self.text_embeddings
        visual = self.clip.visual
        grid_layout(images.shape[-2], images.shape[-1], self.patch_size, self.grid)  # refuses windows below a patch
        x = mmseg_normalize(images)
        with standard_mha():
            tokens, grid = trunk(visual, x.to(module_dtype(self.clip)), self.last_block.pos_interp,
                                 pos_by_count=self.last_block.pos_by_count)
            image_global = None if self.dataset in CROP_GLOBAL else self._image_global()
            if image_global is None:
                glob = self._class_token(tokens)
            else:
                glob = image_global.to(tokens.device).expand(tokens.shape[0], -1)
            feats = project(visual, self._cass_block(tokens, grid, x))  # (B, N, E) unit
        if text.device != feats.device:
            self._text = text = text.to(feats.device)
        with torch.autocast(feats.device.type, enabled=False):  # float32 scores in every precision
            presence = glob.float() @ text.T  # (B, Q)
            adjusted = adjusted_text(feats, text, presence, self.clusters().to(feats.device), self.mean_vector_weight)
            gamma = self.global_semantics_weight
            scores = torch.einsum("bne,bqe->bnq", feats, adjusted) * (1 - gamma) + presence[:, None, :] * gamma
        return scores.transpose(1, 2).reshape(images.shape[0], -1, grid[0], grid[1])
