"""ResCLIP (Yang et al., CVPR'25) as its authors' code runs it, on top of NACLIP, SCLIP, ClearCLIP or CLIP.

Read from yvhangyang/ResCLIP at 0e085f7 (`clip/model.py`: `VisionTransformer.forward`, `create_logit_temp`,
`create_patch_matrix`, `check_path`, `generate_attention_sfr`, `custom_attn`). Only the last block changes:

- **RCS**: the attention probabilities softmax(q s kᵀ) of blocks 5-8 (0-based, every tower depth), averaged,
  are mixed into the last block's attention per head: A <- τ ((1 - λ) A + λ A_rcs).
- **SFR**: a coarse pass (last block with RCS, without SFR) gives cosines, stretched over the window,
  refined by PAMR (10 iterations, dilations 8 and 16, guided by the normalised window), turned into
  softmax(logit_scale · ·) over the names. Pixel labels = argmax (first on ties), 0 (the first *name*) where
  the best probability is below `temp_thd`; patch labels = the most frequent pixel label of each 16x16 block
  of the window's top-left (16h)x(16w) pixels (the smallest label on ties). S_ij = 1 for equal patch labels;
  with `delete_same_entity`, S_ij *= exp(-d_ij / M) unless every sample round(p_i (1 - t_k) + p_j t_k),
  t_k = k / M for k <= d_ij, of the segment carries p_i's label (d = Chebyshev distance in patches, M its
  maximum; the samples stop at d_ij / M of the way, as the reference's do). Every row is smoothed by a 1-D
  Gaussian along the flattened index (kernel min(N, int(6σ + 1)) made odd, zero padding), ReLU'd and
  divided by (row sum + 1e-8); the class-token row and column are 0. The attention logits Z become
  τ ((1 - λ) Z + λ S / max S), S / max S rounded to float16 as the reference does.
- The last block itself is the base's: `naclip` softmax(k kᵀ s + G) (ResCLIP's headline), `clearclip`
  softmax(q qᵀ s), both without residual and FFN; `sclip` softmax(q qᵀ s) + softmax(k kᵀ s) and `clip`
  softmax(q s kᵀ), both with residual and FFN. The SFR mix applies to each logit matrix before its softmax.

Each window is computed on its own (its coarse map, its SFR matrix and that matrix's maximum), so a batch
of windows gives the per-window results. `use_rcs` / `use_sfr` switch the parts off; the authors' segmentor
stores them as 1-tuples (always true), so every published number has both on.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ovseg.errors import ConfigError
from ovseg.pipeline.options import boolean, choice, integer, number
from ovseg.runtime import module_dtype

from .dense import LAST_BLOCKS, LastBlock, _ffn, _heads, _out, _run_block, cosine_scores, embed, naclip_block
from .dense import neighbourhood_bias, project
from .pamr import pamr
from .surgery import MultiLayerPredictor, normalise

BASES = ("naclip", "sclip", "clearclip", "clip")
#: bases whose last block keeps the residual and the FFN (the authors' arch `w_resi`)
WITH_RESIDUAL = ("sclip", "clip")
_SFR_EPS = 1e-8
#: start patches per chunk of the path check: bounds its memory on large whole-image grids
_PATH_CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------------------
# SFR: patch labels and the semantic feedback matrix


def patch_labels(probs: torch.Tensor, grid: tuple[int, int], patch: int, temp_thd: float) -> torch.Tensor:
    """(B, h*w) row-major patch labels from name probabilities (B, Q, H, W) of the whole window."""
    b, q = probs.shape[:2]
    h, w = grid
    best, labels = probs.max(dim=1).values, probs.argmax(dim=1)
    labels = labels.masked_fill(best < temp_thd, 0)[:, : h * patch, : w * patch]
    blocks = labels.reshape(b, h, patch, w, patch).permute(0, 1, 3, 2, 4).reshape(b, h * w, patch * patch)
    counts = torch.zeros(b, h * w, q, device=probs.device, dtype=torch.int32)
    counts.scatter_add_(2, blocks, torch.ones_like(blocks, dtype=torch.int32))
    return counts.argmax(dim=-1)  # the first (smallest) label among equally frequent ones


def chebyshev(grid: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major patch coordinates (N, 2) and their Chebyshev distances (N, N), both int64."""
    h, w = grid
    idx = torch.arange(h * w, device=device)
    coords = torch.stack([idx // w, idx % w], dim=-1)
    return coords, (coords[:, None] - coords[None]).abs().amax(dim=-1)


def path_valid(labels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, N): whether the samples k = 0..d_ij of the segment i -> j all carry i's label.

    Sample k is round(c_i (1 - t_k) + c_j t_k) with t = linspace(0, 1, M + 1) in float32, M = max d; as
    `check_path`, only k <= d_ij is checked (the first d_ij / M of the segment). Chunked over i.
    """
    b, n = labels.shape
    coords, dist = chebyshev(grid, labels.device)
    steps = int(dist.max())
    t = torch.linspace(0, 1, steps + 1, device=labels.device).view(1, 1, -1, 1)
    k = torch.arange(steps + 1, device=labels.device)
    start, end = coords.float()[:, None, None], coords.float()[None, :, None]
    valid = torch.empty(b, n, n, dtype=torch.bool, device=labels.device)
    chunk = max(1, _PATH_CHUNK_ELEMENTS // max(1, b * n * (steps + 1)))
    w = grid[1]
    for s in range(0, n, chunk):
        pts = (start[s : s + chunk] * (1 - t) + end * t).round().long()  # (c, N, M + 1, 2)
        on_path = labels[:, pts[..., 0] * w + pts[..., 1]]  # (B, c, N, M + 1)
        same = on_path == labels[:, s : s + chunk, None, None]
        beyond = k.view(1, 1, -1) > dist[s : s + chunk, :, None]
        valid[:, s : s + chunk] = (same | beyond).all(dim=-1)
    return valid


def sfr_matrix(labels: torch.Tensor, grid: tuple[int, int], std: float, delete_same_entity: bool) -> torch.Tensor:
    """The semantic feedback matrix (B, 1 + N, 1 + N), float32, zero on the class-token row and column."""
    b, n = labels.shape
    same = (labels[:, :, None] == labels[:, None, :]).float()
    if delete_same_entity:
        _, dist = chebyshev(grid, labels.device)
        decay = torch.exp(-dist / int(dist.max()))
        same = torch.where(path_valid(labels, grid), same, same * decay)
    size = min(n, int(6 * std + 1))
    size = size if size % 2 == 1 else size + 1
    x = torch.arange(size, device=labels.device) - size // 2
    kernel = torch.exp(-(x**2) / (2 * std**2))
    kernel = kernel / kernel.sum()
    smooth = F.conv1d(same.reshape(b * n, 1, n), kernel.view(1, 1, -1), padding=size // 2).view(b, n, n)
    smooth = smooth.relu()
    smooth = smooth / (smooth.sum(dim=-1, keepdim=True) + _SFR_EPS)
    return F.pad(smooth, (1, 0, 1, 0))


# ---------------------------------------------------------------------------------------------
# the last block


def mix(logits: torch.Tensor, sfr16: torch.Tensor | None, weights: tuple[float, float]) -> torch.Tensor:
    """τ ((1 - λ) Z + λ S'), λ S' computed in float16 as the reference does; Z unchanged without SFR."""
    if sfr16 is None:
        return logits
    tau, lam = weights
    return tau * ((1 - lam) * logits + (lam * sfr16).to(logits.dtype))


def last_block(
    block,
    tokens: torch.Tensor,
    grid: tuple[int, int],
    base: str,
    std: float,
    rcs: torch.Tensor | None,
    rcs_weights: tuple[float, float],
    sfr: torch.Tensor | None,
    sfr_weights: tuple[float, float],
) -> torch.Tensor:
    """The base's last block with RCS (attention probabilities mixed in) and SFR (logits mixed), all tokens."""
    q, k, v = _heads(block, tokens)
    scale = q.shape[-1] ** -0.5
    sfr16 = None if sfr is None else (sfr / sfr.amax(dim=(-2, -1), keepdim=True)).to(torch.float16)[:, None]
    if base == "naclip":
        bias = neighbourhood_bias(grid, std, k.device, k.dtype)
        attn = (mix((k @ k.transpose(-1, -2)) * scale, sfr16, sfr_weights) + bias).softmax(dim=-1)
    elif base == "clearclip":
        attn = mix((q @ q.transpose(-1, -2)) * scale, sfr16, sfr_weights).softmax(dim=-1)
    elif base == "sclip":
        attn = mix((q @ q.transpose(-1, -2)) * scale, sfr16, sfr_weights).softmax(dim=-1)
        attn = attn + mix((k @ k.transpose(-1, -2)) * scale, sfr16, sfr_weights).softmax(dim=-1)
    else:  # clip
        attn = mix((q * scale) @ k.transpose(-1, -2), sfr16, sfr_weights).softmax(dim=-1)
    if rcs is not None:
        tau, lam = rcs_weights
        attn = tau * ((1 - lam) * attn + lam * rcs)
    out = _out(block, attn @ v)
    return _ffn(block, tokens + out) if base in WITH_RESIDUAL else out


def attention_block(block, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An unchanged block computed explicitly, returning its output and attention probabilities (B, H, n, n)."""
    q, k, v = _heads(block, tokens)
    attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).softmax(dim=-1)
    return _ffn(block, tokens + _out(block, attn @ v)), attn


# ---------------------------------------------------------------------------------------------


def _pair(value, name: str, owner: str) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ConfigError(f"{owner}: {name} must be a pair [tau, lambda], got {value!r}")
    tau = number(value[0], f"{name}[0] (tau)", owner)
    return tau, number(value[1], f"{name}[1] (lambda)", owner, minimum=0.0, maximum=1.0)


class ResCLIPPredictor(MultiLayerPredictor):
    """ResCLIP on a base's last block (`base`: naclip, sclip, clearclip or clip).

    Per-dataset knobs (the authors' `configs/cfg_*.py`): `temp_thd`, `attn_rcs_weights` (τ, λ) and
    `attn_sfr_weights` (τ, λ); their defaults are the ones `demo.py` uses (0.1, (2.0, 0.6), (2.1, 0.6)), since
    the segmentor has none. `gaussian_std` is NACLIP's bias σ and the SFR smoothing σ (5). `logit_scale` is the
    temperature of the SFR coarse map (40, the segmentor's). `rcs_layers` (5, 6, 7, 8) are hard-coded by the
    authors for every backbone. `sfr_pamr_steps` / `sfr_pamr_dilations`: the coarse map's PAMR (10, (8, 16)).
    Grid `floor` only: SFR reads each patch's 16x16 pixel block of the window. `clip_options` are
    `ClipDensePredictor`'s (`cache_dir`, `quick_gelu`, `text_batch_size`, `seed`, `grid`).
    """

    method = "resclip"
    options = (
        "grid", "base", "gaussian_std", "temp_thd", "logit_scale", "attn_rcs_weights", "attn_sfr_weights",
        "delete_same_entity", "use_rcs", "use_sfr", "rcs_layers", "sfr_pamr_steps", "sfr_pamr_dilations",
    )

    def __init__(
        self,
        model: str = "ViT-B-16",
        pretrained: str = "openai",
        templates: str = "imagenet80",
        *,
        base: str = "naclip",
        gaussian_std: float = 5.0,
        temp_thd: float = 0.1,
        logit_scale: float = 40.0,
        attn_rcs_weights: Sequence[float] = (2.0, 0.6),
        attn_sfr_weights: Sequence[float] = (2.1, 0.6),
        delete_same_entity: bool = True,
        use_rcs: bool = True,
        use_sfr: bool = True,
        rcs_layers: Sequence[int] = (5, 6, 7, 8),
        sfr_pamr_steps: int = 10,
        sfr_pamr_dilations: Sequence[int] = (8, 16),
        **clip_options: Any,
    ):
        self.base, self.gaussian_std, self.temp_thd, self.logit_scale = base, gaussian_std, temp_thd, logit_scale
        self.attn_rcs_weights, self.attn_sfr_weights = attn_rcs_weights, attn_sfr_weights
        self.delete_same_entity, self.use_rcs, self.use_sfr = delete_same_entity, use_rcs, use_sfr
        self.rcs_layers = rcs_layers
        self.sfr_pamr_steps, self.sfr_pamr_dilations = sfr_pamr_steps, sfr_pamr_dilations
        super().__init__(model, pretrained, templates, **clip_options)

    def check_options(self) -> None:
        super().check_options()
        owner = self.stage_name
        if self.grid != "floor":
            raise ConfigError(
                f"{owner}: grid must be floor (SFR labels each patch from its 16x16 pixel block of the window, "
                f"as the authors' stride-16 convolution sees it), got {self.grid!r}"
            )
        self.base = choice(self.base, "base", BASES, owner)
        self.gaussian_std = number(self.gaussian_std, "gaussian_std", owner, above=0.0)
        self.temp_thd = number(self.temp_thd, "temp_thd", owner, minimum=0.0, maximum=1.0)
        self.logit_scale = number(self.logit_scale, "logit_scale", owner, above=0.0)
        self.attn_rcs_weights = _pair(self.attn_rcs_weights, "attn_rcs_weights", owner)
        self.attn_sfr_weights = _pair(self.attn_sfr_weights, "attn_sfr_weights", owner)
        self.delete_same_entity = boolean(self.delete_same_entity, "delete_same_entity", owner)
        self.use_rcs = boolean(self.use_rcs, "use_rcs", owner)
        self.use_sfr = boolean(self.use_sfr, "use_sfr", owner)
        self.sfr_pamr_steps = integer(self.sfr_pamr_steps, "sfr_pamr_steps", owner, minimum=0)
        dil = self.sfr_pamr_dilations
        if isinstance(dil, (str, bytes)) or not isinstance(dil, Sequence) or not dil:
            raise ConfigError(f"{owner}: sfr_pamr_dilations must be a list of positive integers, got {dil!r}")
        self.sfr_pamr_dilations = tuple(integer(d, "sfr_pamr_dilations", owner, minimum=1) for d in dil)
        if self.depth is not None and self.use_rcs:  # checked whenever RCS is on (a 2-layer tower can run without)
            self.rcs_layers = self.layers(self.rcs_layers, "rcs_layers")
        self.last_block = self._last_block()

    def _last_block(self) -> LastBlock:
        """The base's block (for its name and positional mode); ResCLIP runs its own version of it."""
        base = LAST_BLOCKS[self.base]
        if self.base == "naclip":
            return LastBlock(base.name, partial(naclip_block, std=self.gaussian_std), base.pos_interp, base.pos_by_count)
        return base

    def extra_repr(self) -> str:
        return f"base={self.base}, " + super().extra_repr()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 patch features (B, h, w, E) on the floor grid of windows (B, 3, H, W) in [0, 1]."""
        full = normalise(images, self.mean, self.std)  # the whole window: PAMR's guide
        p = self.patch_size
        h, w = full.shape[-2] // p, full.shape[-1] // p
        if h == 0 or w == 0:
            raise ConfigError(f"a {tuple(full.shape[-2:])} window is smaller than one {p}-pixel patch (grid: floor)")
        x = full[..., : h * p, : w * p].to(module_dtype(self))
        visual = self.clip.visual
        tokens, grid = embed(visual, x, "dino", pos_by_count=True)
        blocks = visual.transformer.resblocks
        rcs_maps = []
        for i, blk in enumerate(blocks[:-1]):
            if self.use_rcs and i in self.rcs_layers:
                tokens, attn = attention_block(blk, tokens)
                rcs_maps.append(attn)
            else:
                tokens = _run_block(visual.transformer, blk, tokens)
        rcs = torch.stack(rcs_maps).mean(dim=0) if self.use_rcs else None
        run = partial(last_block, blocks[-1], tokens, grid, self.base, self.gaussian_std, rcs, self.attn_rcs_weights)
        sfr = None
        if self.use_sfr:
            coarse = project(visual, run(None, self.attn_sfr_weights)[:, 1:]).view(x.shape[0], h, w, -1)
            sfr = self.semantic_feedback(coarse, full, grid)
        feats = project(visual, run(sfr, self.attn_sfr_weights)[:, 1:])
        return feats.view(x.shape[0], h, w, -1)

    def semantic_feedback(self, coarse: torch.Tensor, guide: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """SFR matrix (B, 1 + N, 1 + N) from the coarse features (B, h, w, E) and the normalised windows."""
        text = self.text_embeddings.to(coarse.device)
        scores = cosine_scores(coarse, text).to(guide.dtype)
        scores = F.interpolate(scores, size=guide.shape[-2:], mode="bilinear", align_corners=False)
        if self.sfr_pamr_steps:
            scores = pamr(guide, scores, self.sfr_pamr_steps, self.sfr_pamr_dilations)
        probs = (scores.to(module_dtype(self)) * self.logit_scale).softmax(dim=1)
        labels = patch_labels(probs, grid, self.patch_size, self.temp_thd)
        return sfr_matrix(labels, grid, self.gaussian_std, self.delete_same_entity)
