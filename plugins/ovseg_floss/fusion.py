"""FLOSS's expert fusion (yasserben/FLOSS `naclip.py` / `dinoclip_inferencer.py`, `expert_fusion`).

Per window, each expert's class probabilities are upsampled to the window; pixel by pixel, expert `e`
*owns* the pixel when its own argmax is its class `e`. The fused probability vector is the vector of
the most confident owner (largest `P_e[e]`, ties to the lowest index; one owner: that owner), or the
default classifier's vector where no expert owns the pixel. The authors fuse after upsampling to the
window and before averaging windows; fusing at the patch grid instead changes labels.

The (experts x names x pixels) volume does not fit in memory for large vocabularies (COCO-Stuff:
about 1.5e9 values per 448-pixel window), so experts are processed in chunks that keep a running
(best confidence, fused vector) pair, which gives exactly the all-at-once result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fuse_experts"]


def fuse_experts(probs: torch.Tensor, size: tuple[int, int], max_elements: int = 2**26) -> torch.Tensor:
    """Fused probabilities (Q, H, W) at `size` from per-expert probabilities (Q + 1, Q, h, w).

    Row `e < Q` is the expert of name `e`, the last row the default classifier; probabilities are
    upsampled bilinearly (`align_corners=False`), `max_elements` bounds one chunk's (n, Q, H, W).
    """
    experts, q = probs.shape[0] - 1, probs.shape[1]
    if experts != q:
        raise ValueError(f"expected (Q + 1, Q, h, w) expert probabilities, got {tuple(probs.shape)}")
    h, w = size

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)

    fused = up(probs[-1:])[0]
    best = fused.new_full((h, w), float("-inf"))
    step = max(1, max_elements // max(1, q * h * w))
    for start in range(0, experts, step):
        chunk = up(probs[start : min(start + step, experts)])  # (n, Q, H, W)
        own = torch.arange(start, start + chunk.shape[0], device=chunk.device).view(-1, 1, 1, 1)
        conf = chunk.gather(1, own.expand(-1, 1, h, w))[:, 0]  # P_e[e]
        conf = conf.masked_fill(chunk.max(1).indices != own[:, 0], float("-inf"))  # argmax, faster on CPU
        top, owner = conf.max(0)  # the first (lowest) expert on ties
        take = top > best  # strictly: an earlier chunk keeps its ties too
        best = torch.where(take, top, best)
        vector = chunk.gather(0, owner.view(1, 1, h, w).expand(1, q, h, w))[0]
        fused = torch.where(take, vector, fused)
    return fused
