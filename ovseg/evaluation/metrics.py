"""Dataset-level mIoU and Boundary IoU as `torchmetrics.Metric`s (mmseg / LPOSS semantics).

Both metrics keep per-class int64 sums (`dist_reduce_fx="sum"`), so a DDP all-reduce is exact and
the result does not depend on how images are split across processes. `compute()` returns
`{"mean": scalar, "per_class": (C,)}` as fractions; a class absent from both prediction and ground
truth over the whole dataset is NaN and left out of the mean (nanmean).

Why not torchmetrics' own classes: `segmentation.MeanIoU` averages per image and has no
`ignore_index`; `MulticlassJaccardIndex` silently miscounts predictions >= C and builds a
(pixels x C^2) mesh in deterministic mode; torchmetrics has no Boundary IoU.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["IoU", "BoundaryIoU"]


def _check_inputs(preds: Tensor, target: Tensor, num_classes: int, ignore_index: int | None) -> tuple[Tensor, Tensor]:
    """Validate shapes, dtypes and label ranges; return (B, H, W) views."""
    if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
        raise TypeError("preds and target must be tensors")
    if preds.shape != target.shape:
        raise ValueError(f"preds and target must have the same shape, got {tuple(preds.shape)} and {tuple(target.shape)}")
    if preds.dim() not in (2, 3):
        raise ValueError(f"expected (H, W) or (B, H, W) label maps, got shape {tuple(preds.shape)}")
    for what, x in (("preds", preds), ("target", target)):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"{what} must be an integer label map, got dtype {x.dtype}")
        bad = (x < 0) | (x >= num_classes)
        if ignore_index is not None:
            bad &= x != ignore_index
        if bool(bad.any()):
            values = torch.unique(x[bad]).tolist()
            shown = ", ".join(map(str, values[:10])) + (", ..." if len(values) > 10 else "")
            allowed = f"[0, {num_classes})" + (f" or ignore_index {ignore_index}" if ignore_index is not None else "")
            raise ValueError(f"{what} holds label values outside {allowed}: {shown}")
    if preds.dim() == 2:
        preds, target = preds.unsqueeze(0), target.unsqueeze(0)
    return preds.long(), target.long()


def _bincount(x: Tensor, minlength: int) -> Tensor:
    """`torch.bincount`, done on CPU when deterministic algorithms are on (CUDA bincount refuses them)."""
    if x.device.type != "cpu" and torch.are_deterministic_algorithms_enabled():
        return torch.bincount(x.cpu(), minlength=minlength).to(x.device)
    return torch.bincount(x, minlength=minlength)


def _fractions(inter: Tensor, union: Tensor) -> dict[str, Tensor]:
    per_class = inter.double() / union.double()  # 0/0 -> NaN for classes absent everywhere
    return {"mean": torch.nanmean(per_class), "per_class": per_class}


class IoU(Metric):
    """Per-class IoU summed over the whole dataset (mmseg `intersect_and_union` + `mean_iou`).

    Pixels whose target is `ignore_index` are dropped. A prediction equal to `ignore_index`
    ("no prediction") counts in the target's area only, as mmseg's histogram drops it.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int | None = 255, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        for state in ("intersection", "area_pred", "area_target"):
            self.add_state(state, default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        preds, target = _check_inputs(preds, target, self.num_classes, self.ignore_index)
        C = self.num_classes
        if self.ignore_index is not None:
            valid = target != self.ignore_index
            preds, target = preds[valid], target[valid]
            # ignored predictions go to an extra column C: they add to the target's area only
            preds = torch.where(preds == self.ignore_index, C, preds)
        # one bincount of a (C, C+1) confusion matrix; never a pixels x C^2 tensor
        confmat = _bincount(target.reshape(-1) * (C + 1) + preds.reshape(-1), minlength=C * (C + 1))
        confmat = confmat.reshape(C, C + 1)
        self.intersection += confmat.diagonal()
        self.area_pred += confmat[:, :C].sum(0)
        self.area_target += confmat.sum(1)

    def compute(self) -> dict[str, Tensor]:
        return _fractions(self.intersection, self.area_pred + self.area_target - self.intersection)


def boundary_width(height: int, width: int, dilation_ratio: float) -> int:
    """`d` of Boundary IoU: `max(1, round(ratio * diagonal))` with Python's round-half-to-even."""
    return max(1, int(round(dilation_ratio * math.sqrt(height**2 + width**2))))


def _max_filter_1d(x: Tensor, k: int, dim: int) -> Tensor:
    """Running max (logical or) over windows of `k` along `dim`; the output is k-1 shorter.

    Same result as `max_pool2d` with a (1, k) / (k, 1) kernel and stride 1, but by doubling shifted
    maxima (window 1, 2, 4, ... then one last shift) it costs O(log k) elementwise ops per pixel
    instead of O(k): 20x faster on CPU for Cityscapes (d = 46).
    """
    n = x.shape[dim]
    w = 1
    while 2 * w <= k:
        x = x.narrow(dim, 0, n - w) | x.narrow(dim, w, n - w)
        n, w = n - w, 2 * w
    if w < k:
        s = k - w  # <= w, so the two windows overlap or touch: their union is contiguous
        x = x.narrow(dim, 0, n - s) | x.narrow(dim, s, n - s)
    return x


def _boundaries(masks: Tensor, d: int) -> Tensor:
    """Inner boundary of each (N, H, W) bool mask: mask minus its erosion by a (2d+1)^2 square.

    Erosion = complement of the dilated complement; pixels outside the image are background, so
    the complement is padded with True.
    """
    bg = torch.nn.functional.pad(~masks, (d, d, d, d), value=True)
    near_bg = _max_filter_1d(_max_filter_1d(bg, 2 * d + 1, dim=2), 2 * d + 1, dim=1)
    return masks & near_bg


class BoundaryIoU(Metric):
    """Boundary IoU per class summed over the dataset, as LPOSS computes it.

    Per image: the prediction is set to `ignore_index` where the target is; for each class present
    in either map, the boundary of `map == c` (ignore pixels count as background) is compared
    between prediction and target; intersections and unions are summed per class.
    `max_elements` bounds the size of one erosion batch (classes are chunked to stay under it).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = 255,
        dilation_ratio: float = 0.02,
        max_elements: int = 2**26,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not dilation_ratio > 0:
            raise ValueError(f"dilation_ratio must be positive, got {dilation_ratio!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.dilation_ratio = float(dilation_ratio)
        self.max_elements = int(max_elements)
        for state in ("intersection", "union"):
            self.add_state(state, default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        preds, target = _check_inputs(preds, target, self.num_classes, self.ignore_index)
        for pred, gt in zip(preds, target):
            self._update_image(pred, gt)

    def _update_image(self, pred: Tensor, gt: Tensor) -> None:
        H, W = gt.shape
        d = boundary_width(H, W, self.dilation_ratio)
        if self.ignore_index is not None:
            pred = torch.where(gt == self.ignore_index, self.ignore_index, pred)
        present = torch.unique(torch.cat([gt.unique(), pred.unique()]))
        present = present[(present >= 0) & (present < self.num_classes)]
        # each class needs two masks (gt, pred) of the padded size, plus temporaries
        per_class = 2 * (H + 2 * d) * (W + 2 * d)
        chunk = max(1, self.max_elements // per_class)
        for classes in present.split(chunk):
            masks = torch.cat([gt.unsqueeze(0) == classes[:, None, None], pred.unsqueeze(0) == classes[:, None, None]])
            b = _boundaries(masks, d)
            bg, bp = b[: len(classes)], b[len(classes) :]
            # `classes` are unique, so plain indexed adds are deterministic on every device
            self.intersection[classes] += (bg & bp).sum((1, 2))
            self.union[classes] += (bg | bp).sum((1, 2))

    def compute(self) -> dict[str, Tensor]:
        return _fractions(self.intersection, self.union)
