"""FLOSS's stage-1 statistic: per template and class, the entropy of the pixels the template gives that class.

As the authors' `EntropyMetric.process` (yasserben/FLOSS `mmseg/evaluation/metrics/entropy_metric.py`):
per image and template, each pixel goes to its argmax class `c`; its entropy is
`-Σ_k p_k · log(p_k + 1e-10)` over the class probabilities; the image adds `mean · count` of class `c`'s
pixels (the mean in float32) to a float64 sum and `count` to a float64 count. The ranking is then
`sum / count` per template and class.

Each image's sum is rounded to a multiple of 2⁻¹², far below the 1e-3 the rankings are read at, so that
the float64 totals are exact sums of representable numbers: the same whatever the order in which
images are added and however many processes share them (totals stay below 2⁵³·2⁻¹²).
"""

from __future__ import annotations

import torch

__all__ = ["entropy_statistics", "QUANTUM"]

QUANTUM = 2.0**-12
EPS = 1e-10


def entropy_statistics(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, C, H, W) class probabilities of one image -> (entropy sums, pixel counts), both (T, C) float64."""
    p = probs.flatten(2).float()
    t, c, _ = p.shape
    entropy = -(p * torch.log(p + EPS)).sum(1, keepdim=True)  # (T, 1, N)
    label = p.max(1, keepdim=True).indices  # = argmax (the first of equal maxima), much faster on CPU
    won = label == torch.arange(c, device=p.device).view(1, c, 1)  # (T, C, N)
    count = won.sum(-1)
    mean = torch.where(won, entropy, 0.0).sum(-1) / count.clamp(min=1)  # float32, as the authors' mean
    sums = torch.round(mean.double() * count.double() / QUANTUM) * QUANTUM
    return sums.cpu(), count.double().cpu()
