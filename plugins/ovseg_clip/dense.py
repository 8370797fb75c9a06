"""One dense forward pass over an open_clip ViT, with the last block swapped per method.

open_clip's `VisionTransformer.forward` pools to one vector and cannot interpolate positional
embeddings, so the patch-token path is written here: patch embedding, class token, interpolated
positional embedding, `ln_pre`, blocks 0..L-2 unchanged, then a `LastBlock` strategy (the only
thing that differs between CLIP, MaskCLIP, SCLIP, ClearCLIP and NACLIP), class token dropped,
`ln_post`, `proj`. Attention variants use `F.scaled_dot_product_attention`, so the same code runs
in float32/bfloat16 on CPU and CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from ovseg.errors import ConfigError
from ovseg.pipeline.patches import resample_pos_embed

Grid = tuple[int, int]
#: (block, tokens (B, 1 + h*w, D) batch-first, patch grid (h, w)) -> tokens (B, 1 + h*w, D)
BlockFn = Callable[[nn.Module, torch.Tensor, Grid], torch.Tensor]


@dataclass(frozen=True)
class LastBlock:
    """How a method runs the last transformer block, and how it resizes positional embeddings."""

    name: str
    forward: BlockFn
    #: positional embeddings for other grids (`ovseg.pipeline.patches.resample_pos_embed`): "size" (MaskCLIP,
    #: bicubic to the exact size) or "dino" (SCLIP, ClearCLIP, NACLIP: bicubic with DINO's +0.1 scale factor)
    pos_interp: Literal["size", "dino"]
    #: keep the table when the grid has as many patches as it (a 7x28 grid for 14x14): the SCLIP-family code
    #: resamples only when the token count changes; LPOSS's MaskCLIP resamples whenever the grid changes
    pos_by_count: bool = False


# ---------------------------------------------------------------------------------------------
# checks


def check_vit(visual: nn.Module) -> None:
    """Raise ConfigError unless `visual` is an open_clip ViT whose last block these methods can edit."""
    if not isinstance(visual, VisionTransformer):
        raise ConfigError(
            f"the image tower is {type(visual).__name__}, not an open_clip VisionTransformer; the dense "
            "CLIP methods change the last transformer block and need a ViT model (e.g. ViT-B-16)"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise ConfigError("ViTs with an attentional pooler (CoCa) are not supported by the dense CLIP methods")
    if visual.patch_size[0] != visual.patch_size[1]:
        raise ConfigError(f"non-square patches {visual.patch_size} are not supported")
    last = visual.transformer.resblocks[-1]
    attn = getattr(last, "attn", None)
    if not (
        isinstance(last, ResidualAttentionBlock)
        and isinstance(attn, nn.MultiheadAttention)
        and attn.in_proj_weight is not None
        and attn.bias_k is None
        and not attn.add_zero_attn
        and not hasattr(last, "ln_1_kv")
    ):
        raise ConfigError(
            f"the last block is {type(last).__name__} with {type(attn).__name__}; the dense CLIP methods need "
            "open_clip's ResidualAttentionBlock with a packed nn.MultiheadAttention (in_proj_weight)"
        )


# ---------------------------------------------------------------------------------------------
# pieces of the last block


def _heads(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as (B, heads, N, head_dim) from the block's packed input projection of ln_1(x)."""
    attn: nn.MultiheadAttention = block.attn
    b, n, d = x.shape
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    qkv = qkv.view(b, n, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def _out(block: nn.Module, o: torch.Tensor) -> torch.Tensor:
    """Merge heads (B, heads, N, hd) -> (B, N, D), out_proj, then the block's layer scale ls_1."""
    b, _, n, _ = o.shape
    o = block.attn.out_proj(o.transpose(1, 2).reshape(b, n, -1))
    return block.ls_1(o)


def _ffn(block: nn.Module, y: torch.Tensor) -> torch.Tensor:
    return y + block.ls_2(block.mlp(block.ln_2(y)))


def _block_mask(block: nn.Module, n: int, like: torch.Tensor) -> torch.Tensor | None:
    """An additive attention mask a block may carry (OpenAI's code keeps `attn_mask`; ViTs use None)."""
    mask = getattr(block, "attn_mask", None)
    if mask is None:
        return None
    mask = mask[:n, :n]
    if mask.dtype == torch.bool:  # True = not allowed, as in nn.MultiheadAttention
        mask = torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(mask, float("-inf"))
    return mask.to(device=like.device, dtype=like.dtype)


def _attend(q, k, v, mask=None) -> torch.Tensor:
    """softmax(q kᵀ · head_dim^-½ + mask) v."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ---------------------------------------------------------------------------------------------
# the five last blocks


def clip_block(block: nn.Module, x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Unchanged: the block's own forward (q-k attention, residual, FFN)."""
    mask = getattr(block, "attn_mask", None)
    return block(x, attn_mask=mask) if mask is not None else block(x)


def maskclip_block(block: nn.Module, x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Value path only: v = x + out_proj(v_proj(ln_1 x)); v = v + mlp(ln_2 v)."""
    attn: nn.MultiheadAttention = block.attn
    d = x.shape[-1]
    bias = attn.in_proj_bias[2 * d :] if attn.in_proj_bias is not None else None
    v = F.linear(block.ln_1(x), attn.in_proj_weight[2 * d :], bias)
    return _ffn(block, x + block.ls_1(attn.out_proj(v)))


def sclip_block(block: nn.Module, x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Correlative self-attention: (softmax(q qᵀs) + softmax(k kᵀs)) v, residual and FFN kept."""
    q, k, v = _heads(block, x)
    mask = _block_mask(block, x.shape[1], q)
    y = x + _out(block, _attend(q, q, v, mask) + _attend(k, k, v, mask))
    return _ffn(block, y)


def clearclip_block(block: nn.Module, x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """q-q attention, no residual, no FFN: out_proj(softmax(q qᵀs) v)."""
    q, _, v = _heads(block, x)
    return _out(block, _attend(q, q, v, _block_mask(block, x.shape[1], q)))


_GAUSS_CACHE: dict[tuple, torch.Tensor] = {}


def neighbourhood_bias(grid: Grid, std: float, device, dtype) -> torch.Tensor:
    """NACLIP's (1 + h*w)² bias G = exp(-d²/(2 std²)) over patch-grid distance, 0 on the class row/column."""
    key = (tuple(grid), float(std), str(device), dtype)
    if key not in _GAUSS_CACHE:
        h, w = grid
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ys, xs = ys.reshape(-1).double(), xs.reshape(-1).double()
        d2 = (ys[:, None] - ys[None, :]) ** 2 + (xs[:, None] - xs[None, :]) ** 2
        g = F.pad(torch.exp(-d2 / (2 * std**2)), (1, 0, 1, 0))
        if len(_GAUSS_CACHE) > 32:
            _GAUSS_CACHE.clear()
        _GAUSS_CACHE[key] = g.to(device=device, dtype=dtype)
    return _GAUSS_CACHE[key]


def naclip_block(block: nn.Module, x: torch.Tensor, grid: Grid, std: float = 5.0) -> torch.Tensor:
    """Neighbourhood attention: out_proj(softmax(k kᵀs + G) v), no residual, no FFN."""
    _, k, v = _heads(block, x)
    bias = neighbourhood_bias(grid, std, k.device, k.dtype)
    mask = _block_mask(block, x.shape[1], k)
    return _out(block, _attend(k, k, v, bias if mask is None else bias + mask))


LAST_BLOCKS: dict[str, LastBlock] = {
    "clip": LastBlock("clip", clip_block, "dino", pos_by_count=True),
    "maskclip": LastBlock("maskclip", maskclip_block, "size"),
    "sclip": LastBlock("sclip", sclip_block, "dino", pos_by_count=True),
    "clearclip": LastBlock("clearclip", clearclip_block, "dino", pos_by_count=True),
    "naclip": LastBlock("naclip", naclip_block, "dino", pos_by_count=True),
}


# ---------------------------------------------------------------------------------------------
# the shared forward


def _run_block(transformer: nn.Module, block: nn.Module, x: torch.Tensor, *, reference_path: bool = False) -> torch.Tensor:
    """One open_clip block on batch-first tokens.

    `reference_path`: run `nn.MultiheadAttention`'s unfused path, as the authors' OpenAI `clip` (whose
    blocks are sequence-first and never take PyTorch's fused inference fast path) does. The fast path
    open_clip's batch-first blocks take under `no_grad` orders its operations differently and moves
    block outputs by ~1e-6 per block: harmless for methods that only read the last block's values
    (labels ≥ 99.997 % equal), but enough to flip SC-CLIP's anomaly test at its threshold. With the
    fused path off the block outputs are bit-identical to the authors' (about 1.5x the CPU time of
    the trunk), so SC-CLIP asks for it.
    """
    if reference_path:
        enabled = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return _run_block(transformer, block, x)
        finally:
            torch.backends.mha.set_fastpath_enabled(enabled)
    if getattr(transformer, "batch_first", True):
        return block(x)
    return block(x.transpose(0, 1)).transpose(0, 1)


def embed(
    visual: VisionTransformer, x: torch.Tensor, pos_interp: str, *, pos_by_count: bool = False
) -> tuple[torch.Tensor, Grid]:
    """Tokens entering block 0 (B, 1 + h*w, D) batch-first, and the patch grid (h, w), of normalised images.

    Patch embedding (the stride-p convolution drops a remainder of x: the `floor` grid), class token,
    positional embedding resampled to the grid (`resample_pos_embed` mode `pos_interp`), `ln_pre`.
    `pos_by_count`: keep the table whenever the grid has as many patches as the table (7x28 for 14x14),
    as the SCLIP-family code decides by token count, not by grid.
    """
    b = x.shape[0]
    tokens = visual.conv1(x)  # (B, D, h, w)
    grid = tuple(tokens.shape[-2:])
    tokens = tokens.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(tokens.dtype).view(1, 1, -1).expand(b, -1, -1)
    old = tuple(visual.grid_size)
    if pos_by_count and grid[0] * grid[1] == old[0] * old[1]:
        pos = visual.positional_embedding
    else:
        pos = resample_pos_embed(visual.positional_embedding, old, grid, pos_interp)
    tokens = torch.cat([cls, tokens], dim=1) + pos.to(tokens.dtype)
    # patch dropout is skipped: it is the identity in eval mode and a dense map needs every patch
    return visual.ln_pre(tokens), grid


def trunk(
    visual: VisionTransformer, x: torch.Tensor, pos_interp: str, *, pos_by_count: bool = False
) -> tuple[torch.Tensor, Grid]:
    """Tokens (B, 1 + h*w, D) that enter the last block, and the grid: `embed`, then blocks 0..L-2 unchanged.

    Shared by every dense method, including the VFM-guided ones (ovseg_vfm) that replace the last block.
    """
    tokens, grid = embed(visual, x, pos_interp, pos_by_count=pos_by_count)
    for blk in visual.transformer.resblocks[:-1]:
        tokens = _run_block(visual.transformer, blk, tokens)
    return tokens, grid


def project(visual: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """L2-normalised float32 features (B, n, E) of final tokens (B, n, D): `ln_post`, `proj`."""
    feats = visual.ln_post(tokens)
    if visual.proj is not None:
        feats = feats @ visual.proj
    return F.normalize(feats.float(), dim=-1)


def dense_features(visual: VisionTransformer, x: torch.Tensor, last: LastBlock) -> torch.Tensor:
    """L2-normalised float32 patch features (B, h, w, E) of normalised, padded images x (B, 3, H, W)."""
    tokens, grid = trunk(visual, x, last.pos_interp, pos_by_count=last.pos_by_count)
    block = visual.transformer.resblocks[-1]
    if getattr(visual.transformer, "batch_first", True) or last.forward is not clip_block:
        tokens = last.forward(block, tokens, grid)
    else:
        tokens = _run_block(visual.transformer, block, tokens)
    return project(visual, tokens[:, 1:]).view(x.shape[0], grid[0], grid[1], -1)


def cosine_scores(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(B, h, w, E) image features x (Q, E) text embeddings -> (B, Q, h, w) float32 cosines.

    Autocast is switched off here so that a bf16-mixed engine still gets float32 scores.
    """
    with torch.autocast(features.device.type, enabled=False):
        return torch.einsum("bhwe,qe->bqhw", features.float(), text.to(features.device, torch.float32))
