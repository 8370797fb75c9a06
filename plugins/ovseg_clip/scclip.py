"""SC-CLIP (self-calibrated CLIP, Bai et al., arXiv 2411.15869) as its authors' code runs it.

Read from SuleBai/SC-CLIP at 0417ba9 (`clip/model.py`: `VisionTransformer.forward`, `lof_pytorch`,
`mean_interpolation`, `custom_attn`, `adaptively_aggregate`). With F_i the output of block i (0-based),
L blocks, β = 0.4 and rownorm(A) = A / (row sum + 1e-6):

1. blocks 0..L-2 run unchanged;
2. anomaly tokens: local outlier factor of the patch tokens of F_{L-2} (squared Euclidean distances,
   k = 30 nearest others, reachability = the token's *own* k-distance), outliers = LOF strictly above its
   0.95 quantile (linear interpolation);
3. repair: each outlier becomes the mean of its in-grid, non-outlier 8-neighbours (unchanged if none), in
   F_{L-2} (giving X) and in F_pre;
4. S_mid = cosine similarity of the repaired F_pre patches; X <- rownorm(S_mid >= β) X;
5. last block, attention only: A = (softmax(M) + softmax(k kᵀ s)) / 2 per head, M = 3 (S_mid - mean S_mid)
   with negative entries -inf; O = out_proj(A v) + res_cls · (class token of F_{L-2});
6. Y = rownorm(S_post >= β) O, S_post from the unrepaired patches of F_post;
7. R = F_ms + ... + F_{me-1} (class tokens too); Y += rownorm(S_post >= β) (out_proj(A_R v_R) + res_cls · R_cls),
   with A_R the attention of step 5 on R's patches (same M);
8. `ln_post`, `proj`, cosine with the names.

Everything is per window (LOF, quantile, mean of S_mid); a batch of windows gives the per-window results.
Deviations from the authors' code, which only runs square grids with at least 31 patches: outlier positions
are row-major on non-square grids (the reference divides the flat index by the number of rows, which
indexes wrong cells or raises IndexError), and a window with no more patches than `lof_neighbors` skips the
outlier test (the reference's `topk` fails there).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ovseg.errors import ConfigError
from ovseg.pipeline.options import integer, number
from ovseg.pipeline.patches import prepare_images
from ovseg.runtime import module_dtype

from .dense import _heads, _out, _run_block, embed, project
from .surgery import MultiLayerPredictor

#: the authors' indices per image-tower depth: ViT-B/16 (configs/base_config.py at 0417ba9) and ViT-L/14
#: (the commented block of configs/base_config.py in the initial commit 74471da)
AUTHOR_DEFAULTS = {
    12: dict(pre_adjust_idx=8, post_adjust_idx=3, multi_start_idx=3, multi_end_idx=10, res_cls=0.3),
    24: dict(pre_adjust_idx=16, post_adjust_idx=6, multi_start_idx=8, multi_end_idx=19, res_cls=0.1),
}
_MID_FACTOR = 3.0  # custom_attn: (S_mid - mean) * 3
_EPS = 1e-6  # adaptively_aggregate


def lof_outliers(x: torch.Tensor, k: int = 30, contamination: float = 0.05) -> torch.Tensor:
    """(B, N) mask of the tokens whose local outlier factor is strictly above its per-image quantile.

    x: (B, N, D) tokens. As `lof_pytorch`: squared Euclidean distances, the k nearest others, reachability
    with the token's own k-distance, LOF = mean_j lrd_j / lrd_i, `torch.quantile(LOF, 1 - contamination)`.
    Images with no more than k tokens have no outliers (the reference cannot run them).
    """
    b, n, _ = x.shape
    if n <= k:
        return torch.zeros(b, n, dtype=torch.bool, device=x.device)
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in float32 (float64 stays)
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    knn, idx = torch.topk(dist, k + 1, dim=-1, largest=False)
    knn, idx = knn[..., 1:], idx[..., 1:]
    reach = torch.maximum(knn, knn[..., -1:])
    lrd = k / torch.nan_to_num(reach.mean(dim=-1), nan=1e-6)  # (B, N)
    lof = (torch.gather(lrd, 1, idx.reshape(b, -1)).view(b, n, k) / lrd[..., None]).mean(dim=-1)
    threshold = torch.quantile(lof, 1 - contamination, dim=-1, keepdim=True)
    return lof > threshold


def repair(tokens: torch.Tensor, outliers: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch tokens (B, N, D) with each outlier replaced by the mean of its in-grid, non-outlier 8-neighbours.

    `outliers` (B, N) is row-major on the (h, w) grid; an outlier without such a neighbour is kept.
    """
    b, n, d = tokens.shape
    h, w = grid
    fmap = tokens.transpose(1, 2).reshape(b, d, h, w)
    keep = (~outliers).to(tokens.dtype).view(b, 1, h, w)
    masked, count_in = F.pad(fmap * keep, (1, 1, 1, 1)), F.pad(keep, (1, 1, 1, 1))
    offsets = [(dy, dx) for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1)]
    total = sum(masked[..., dy : dy + h, dx : dx + w] for dy, dx in offsets)
    count = sum(count_in[..., dy : dy + h, dx : dx + w] for dy, dx in offsets)
    update = outliers.view(b, 1, h, w) & (count > 0)
    fmap = torch.where(update, total / count.clamp(min=1), fmap)
    return fmap.reshape(b, d, n).transpose(1, 2)


def cosine_matrix(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, N) cosine similarities of tokens (B, N, D)."""
    unit = tokens / tokens.norm(dim=-1, keepdim=True)
    return unit @ unit.transpose(1, 2)


def aggregate(tokens: torch.Tensor, similarity: torch.Tensor, beta: float) -> torch.Tensor:
    """rownorm(similarity with entries below beta set to 0) @ tokens."""
    corr = similarity.masked_fill(similarity < beta, 0.0)
    return (corr / (corr.sum(dim=-1, keepdim=True) + _EPS)) @ tokens


def mid_attention(s_mid: torch.Tensor) -> torch.Tensor:
    """softmax(M), M = 3 (S_mid - mean S_mid) with negative entries -inf; the mean is per image."""
    m = (s_mid - s_mid.mean(dim=(-2, -1), keepdim=True)) * _MID_FACTOR
    return m.masked_fill(m < 0.0, float("-inf")).softmax(dim=-1)


def calibrated_attention(block, patches: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """out_proj(A v), A = (softmax(M) + softmax(k kᵀ s)) / 2 per head, on patch tokens (no class token)."""
    _, k, v = _heads(block, patches)
    kk = (k @ k.transpose(-1, -2)) * k.shape[-1] ** -0.5
    attn = (mid[:, None] + kk.softmax(dim=-1)) / 2
    return _out(block, attn @ v)


class SCCLIPPredictor(MultiLayerPredictor):
    """SC-CLIP: anomaly-token repair, self-adjusting similarity and multi-level fusion around CLIP's last block.

    Layer options address block outputs (0-based; `multi_end_idx` exclusive). Left unset they take the
    authors' values for the tower's depth: 12 blocks (ViT-B/16) 8 / 3 / 3 / 10 and `res_cls` 0.3, 24 blocks
    (ViT-L/14) 16 / 6 / 8 / 19 and 0.1; other depths must set them. `beta`, `lof_neighbors` and
    `lof_contamination` are constants in the authors' code (0.4, 30, 0.05). Grid `floor` (the stride-16 patch
    convolution drops a window's remainder; the map is stretched over the window). `clip_options` are
    `ClipDensePredictor`'s (`cache_dir`, `quick_gelu`, `text_batch_size`, `seed`, `grid`).
    """

    method = "scclip"
    options = (
        "grid", "pre_adjust_idx", "post_adjust_idx", "multi_start_idx", "multi_end_idx", "res_cls",
        "beta", "lof_neighbors", "lof_contamination",
    )

    def __init__(
        self,
        model: str = "ViT-B-16",
        pretrained: str = "openai",
        templates: str = "imagenet80",
        *,
        pre_adjust_idx: int | None = None,
        post_adjust_idx: int | None = None,
        multi_start_idx: int | None = None,
        multi_end_idx: int | None = None,
        res_cls: float | None = None,
        beta: float = 0.4,
        lof_neighbors: int = 30,
        lof_contamination: float = 0.05,
        **clip_options: Any,
    ):
        self.pre_adjust_idx, self.post_adjust_idx = pre_adjust_idx, post_adjust_idx
        self.multi_start_idx, self.multi_end_idx, self.res_cls = multi_start_idx, multi_end_idx, res_cls
        self.beta, self.lof_neighbors, self.lof_contamination = beta, lof_neighbors, lof_contamination
        super().__init__(model, pretrained, templates, **clip_options)

    def check_options(self) -> None:
        super().check_options()
        owner = self.stage_name
        self.beta = number(self.beta, "beta", owner, minimum=-1.0, maximum=1.0)
        self.lof_neighbors = integer(self.lof_neighbors, "lof_neighbors", owner, minimum=1)
        self.lof_contamination = number(self.lof_contamination, "lof_contamination", owner, above=0.0, below=1.0)
        if self.depth is None:
            return
        names = list(AUTHOR_DEFAULTS[12])
        unset = [n for n in names if getattr(self, n) is None]
        if unset:
            defaults = AUTHOR_DEFAULTS.get(self.depth)
            if defaults is None:
                raise ConfigError(
                    f"{owner}: {', '.join(unset)} have the authors' defaults only for 12-layer (ViT-B/16) and 24-layer "
                    f"(ViT-L/14) image towers; this one has {self.depth} layers: set them"
                )
            for n in unset:
                setattr(self, n, defaults[n])
        self.pre_adjust_idx = self.layer(self.pre_adjust_idx, "pre_adjust_idx")
        self.post_adjust_idx = self.layer(self.post_adjust_idx, "post_adjust_idx")
        self.multi_start_idx = self.layer(self.multi_start_idx, "multi_start_idx")
        self.multi_end_idx = self.layer(self.multi_end_idx, "multi_end_idx", last=self.depth - 1)
        if self.multi_end_idx <= self.multi_start_idx:
            raise ConfigError(
                f"{owner}: multi_end_idx ({self.multi_end_idx}) must be greater than multi_start_idx "
                f"({self.multi_start_idx}): the fused block outputs are multi_start_idx .. multi_end_idx - 1"
            )
        self.res_cls = number(self.res_cls, "res_cls", owner)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = prepare_images(images, self.mean, self.std, self.patch_size, dtype=module_dtype(self), grid=self.grid)
        return self.calibrated_features(x)

    def calibrated_features(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 patch features (B, h, w, E) of normalised images x fitted to the grid."""
        visual = self.clip.visual
        tokens, grid = embed(visual, x, "dino", pos_by_count=True)
        blocks = visual.transformer.resblocks
        fused = f_pre = f_post = None
        for i, blk in enumerate(blocks[:-1]):  # the authors' unfused attention: their LOF test is a threshold
            tokens = _run_block(visual.transformer, blk, tokens, reference_path=True)
            if i == self.pre_adjust_idx:
                f_pre = tokens[:, 1:]
            if i == self.post_adjust_idx:
                f_post = tokens[:, 1:]
            if self.multi_start_idx <= i < self.multi_end_idx:
                fused = tokens if fused is None else fused + tokens
        cls, patches = tokens[:, :1], tokens[:, 1:]
        outliers = lof_outliers(patches, self.lof_neighbors, self.lof_contamination)
        s_mid = cosine_matrix(repair(f_pre, outliers, grid))
        mid = mid_attention(s_mid)
        last = blocks[-1]
        x_adj = aggregate(repair(patches, outliers, grid), s_mid, self.beta)
        out = calibrated_attention(last, x_adj, mid) + self.res_cls * cls
        s_post = cosine_matrix(f_post)
        out = aggregate(out, s_post, self.beta)
        multi = calibrated_attention(last, fused[:, 1:], mid) + self.res_cls * fused[:, :1]
        out = out + aggregate(multi, s_post, self.beta)
        return project(visual, out).view(x.shape[0], grid[0], grid[1], -1)
