"""Dataset-level mIoU and Boundary IoU as `torchmetrics.Metric`s (mmseg / LPOSS semantics).

Both metrics keep per-class int64 sums (`dist_reduce_fx="sum"`), so a DDP all-reduce is exact and
the result does not depend on how images are split across processes. `compute()` returns
`{"mean": scalar, "per_class": (C,)}` as fractions; a class absent from both prediction and ground
truth over the whole dataset is NaN and left out of the mean (nanmean).

Why not torchmetrics' own classes: `segmentation.MeanIoU` averages per image and has no
`ignore_index`; `MulticlassJaccardIndex` silently miscounts predictions >= C and builds a
(pixels x C^2) mesh in deterministic mode; torchmetrics has no Boundary IoU.

Each metric has a functional twin for one image or a batch (`mean_iou`, `boundary_iou`), sharing
its counting helpers (`_iou_counts`, `_boundary_counts`), as torchmetrics pairs its classes with
functions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["IoU", "BoundaryIoU", "mean_iou", "boundary_iou"]


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


def _iou_counts(preds: Tensor, target: Tensor, num_classes: int, ignore_index: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class (intersection, predicted area, target area) of validated (B, H, W) maps."""
    C = num_classes
    if ignore_index is not None:
        valid = target != ignore_index
        preds, target = preds[valid], target[valid]
        # ignored predictions go to an extra column C: they add to the target's area only
        preds = torch.where(preds == ignore_index, C, preds)
    # one bincount of a (C, C+1) confusion matrix; never a pixels x C^2 tensor
    confmat = _bincount(target.reshape(-1) * (C + 1) + preds.reshape(-1), minlength=C * (C + 1)).reshape(C, C + 1)
    return confmat.diagonal(), confmat[:, :C].sum(0), confmat.sum(1)


def mean_iou(preds: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = 255) -> dict[str, Tensor]:
    """IoU of (H, W) or (B, H, W) label maps, the batch summed as one dataset (see `IoU`).

    Example:
        >>> import torch
        >>> pred = torch.tensor([[0, 0, 1], [1, 1, 255]])
        >>> gt = torch.tensor([[0, 1, 1], [1, 1, 255]])
        >>> r = mean_iou(pred, gt, num_classes=2)
        >>> [round(v, 3) for v in r["per_class"].tolist()], round(float(r["mean"]), 3)
        ([0.5, 0.75], 0.625)
    """
    preds, target = _check_inputs(preds, target, num_classes, ignore_index)
    inter, area_pred, area_target = _iou_counts(preds, target, num_classes, ignore_index)
    return _fractions(inter, area_pred + area_target - inter)


class IoU(Metric):
    """Per-class IoU summed over the whole dataset (mmseg `intersect_and_union` + `mean_iou`).

    Pixels whose target is `ignore_index` are dropped. A prediction equal to `ignore_index`
    ("no prediction") counts in the target's area only, as mmseg's histogram drops it.

    Example:
        >>> import torch
        >>> metric = IoU(num_classes=2)
        >>> metric.update(torch.tensor([[0, 0, 1]]), torch.tensor([[0, 1, 1]]))
        >>> metric.update(torch.tensor([[1, 1, 255]]), torch.tensor([[1, 1, 255]]))
        >>> round(float(metric.compute()["mean"]), 3)
        0.625
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
        inter, area_pred, area_target = _iou_counts(preds, target, self.num_classes, self.ignore_index)
        self.intersection += inter
        self.area_pred += area_pred
        self.area_target += area_target

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


def _boundary_counts(
    preds: Tensor, target: Tensor, num_classes: int, ignore_index: int | None, dilation_ratio: float, max_elements: int
) -> tuple[Tensor, Tensor]:
    """Per-class boundary (intersection, union) of validated (B, H, W) maps, image by image."""
    inter = torch.zeros(num_classes, dtype=torch.long, device=target.device)
    union = torch.zeros_like(inter)
    for pred, gt in zip(preds, target):
        H, W = gt.shape
        d = boundary_width(H, W, dilation_ratio)
        if ignore_index is not None:
            pred = torch.where(gt == ignore_index, ignore_index, pred)
        present = torch.unique(torch.cat([gt.unique(), pred.unique()]))
        present = present[(present >= 0) & (present < num_classes)]
        # each class needs two masks (gt, pred) of the padded size, plus temporaries
        chunk = max(1, max_elements // (2 * (H + 2 * d) * (W + 2 * d)))
        for classes in present.split(chunk):
            masks = torch.cat([gt.unsqueeze(0) == classes[:, None, None], pred.unsqueeze(0) == classes[:, None, None]])
            b = _boundaries(masks, d)
            bg, bp = b[: len(classes)], b[len(classes) :]
            # `classes` are unique, so plain indexed adds are deterministic on every device
            inter[classes] += (bg & bp).sum((1, 2))
            union[classes] += (bg | bp).sum((1, 2))
    return inter, union


def boundary_iou(
    preds: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = 255, dilation_ratio: float = 0.02
) -> dict[str, Tensor]:
    """Boundary IoU of (H, W) or (B, H, W) label maps, the batch summed as one dataset (see `BoundaryIoU`).

    Example:
        >>> import torch
        >>> gt = torch.zeros(8, 8, dtype=torch.long); gt[:, 4:] = 1
        >>> r = boundary_iou(gt.clone(), gt, num_classes=2)
        >>> r["per_class"].tolist()
        [1.0, 1.0]
    """
    preds, target = _check_inputs(preds, target, num_classes, ignore_index)
    return _fractions(*_boundary_counts(preds, target, num_classes, ignore_index, float(dilation_ratio), 2**26))


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
        inter, union = _boundary_counts(preds, target, self.num_classes, self.ignore_index, self.dilation_ratio,
                                        self.max_elements)
        self.intersection += inter
        self.union += union

    def compute(self) -> dict[str, Tensor]:
        return _fractions(self.intersection, self.union)
