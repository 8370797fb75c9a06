"""GroupViT / PGSeg segmentation decoding as batched tensor functions.

The release decodes one window (a 448 crop) like this:

1. chain the soft assignments of the grouping stages into patch-to-group weights (N, G), resize them
   bilinearly to the crop's pixels and take the arg-max: a one-hot pixel-to-group map;
2. group-text probabilities: `softmax(s * g @ t.T)`, and again with every class outside the image's
   top-5 (by the image embedding's softmax) set to -inf; the product of the two;
3. pixel scores = one-hot map @ group probabilities;
4. datasets with a background class do not prompt it: a pixel is background where its best score
   is below `min(bg_thresh, the window's largest group probability)`.

Each step is a function here so tests and other plugins can check or reuse it. Scores are float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def assignment_to_pixels(
    assignment: torch.Tensor, grid: tuple[int, int], patch_size: int, size: tuple[int, int]
) -> torch.Tensor:
    """Patch-to-group weights (B, h*w, G) -> pixel-to-group weights (B, H*W, G).

    Bilinear (`align_corners=False`) to the padded canvas (h*p, w*p), then cropped to `size`: for an
    input that is a multiple of the patch, exactly the release's resize to the crop.
    """
    b, _, g = assignment.shape
    h, w = grid
    maps = assignment.transpose(1, 2).reshape(b, g, h, w)
    maps = F.interpolate(maps, size=(h * patch_size, w * patch_size), mode="bilinear", align_corners=False)
    maps = maps[:, :, : size[0], : size[1]]
    return maps.flatten(2).transpose(1, 2)


def one_hot_groups(assignment: torch.Tensor) -> torch.Tensor:
    """Hard assignment: one-hot of the arg-max group, (B, N, G) -> (B, N, G)."""
    return F.one_hot(assignment.argmax(dim=-1), num_classes=assignment.shape[-1]).to(assignment.dtype)


def topk_class_mask(image_logits: torch.Tensor, name_to_class: torch.Tensor, k: int) -> torch.Tensor:
    """Names (B, Q) whose class is among the image's `k` best classes (all classes if fewer).

    A class scores as its best name (with one name per class this is the release's top-k over
    classes). `k` counts the distinct classes present in `name_to_class`.
    """
    classes = torch.unique(name_to_class)
    k = min(int(k), classes.numel())
    num_classes = int(name_to_class.max()) + 1
    index = name_to_class.to(image_logits.device).expand_as(image_logits)
    class_logits = image_logits.new_full((image_logits.shape[0], num_classes), float("-inf"))
    class_logits = class_logits.scatter_reduce(1, index, image_logits, reduce="amax", include_self=True)
    top = class_logits.topk(k, dim=1).indices
    keep = torch.zeros_like(class_logits, dtype=torch.bool).scatter_(1, top, True)
    return keep.gather(1, index)


def group_class_probs(group_logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The release's group affinity: `softmax(masked logits) * softmax(logits)` over names.

    `group_logits` (B, G, Q) are temperature-scaled group-text cosines; `keep` (B, Q) the names
    allowed in this window (`topk_class_mask`). Masked names get probability 0.
    """
    masked = group_logits.masked_fill(~keep[:, None, :], float("-inf"))
    return masked.softmax(dim=-1) * group_logits.softmax(dim=-1)


def background_groups(probs: torch.Tensor, bg_thresh: float) -> torch.Tensor:
    """Groups (B, G) whose best probability is below `min(bg_thresh, the window's best probability)`.

    The per-window clamp keeps the window's best group in the foreground. A pixel's best score is
    its group's best probability, so deciding per group equals the release's per-pixel test.
    """
    thresh = probs.amax(dim=(1, 2)).clamp(max=bg_thresh)
    return probs.amax(dim=-1) < thresh[:, None]


def paper_group_scores(
    groups: torch.Tensor,
    image: torch.Tensor,
    text: torch.Tensor,
    *,
    logit_scale: float,
    topk: int,
    name_to_class: torch.Tensor,
    background: torch.Tensor | None = None,
    bg_thresh: float | None = None,
) -> torch.Tensor:
    """Per-group scores (B, G, Q) of the release's decoding, before the pixel assignment.

    `groups` (B, G, E) and `image` (B, E) normalised embeddings, `text` (Q, E) normalised name
    embeddings, `name_to_class` (Q,). With `bg_thresh`, the names flagged in `background` (Q,) are not
    matched: their column is 1 for background groups and 0 elsewhere; every other column holds the
    group probabilities over the non-background names.
    """
    q = text.shape[0]
    if bg_thresh is None:
        background = torch.zeros(q, dtype=torch.bool, device=text.device)
    elif background is None or not bool(background.any()):
        raise ValueError("bg_thresh needs at least one background name")
    else:
        background = background.to(text.device)
    fg = ~background
    if not bool(fg.any()):
        raise ValueError("every name is a background name: nothing to match")
    fg_text = text[fg]
    group_logits = logit_scale * groups @ fg_text.T
    image_logits = logit_scale * image @ fg_text.T
    keep = topk_class_mask(image_logits, name_to_class.to(text.device)[fg], topk)
    probs = group_class_probs(group_logits, keep)
    scores = probs.new_zeros(*probs.shape[:2], q)
    scores[..., fg] = probs
    if bg_thresh is not None:
        scores[..., background] = background_groups(probs, bg_thresh).to(probs.dtype)[..., None]
    return scores
