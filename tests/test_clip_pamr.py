"""PAMR against an independent port of the reference's shift-kernel convolutions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovseg import build_refiner
from ovseg.errors import ConfigError
from ovseg.pipeline.windows import merge_windows, sliding_windows


def _kernels(kind: str) -> torch.Tensor:
    """The reference's 3x3 kernels: 'aff' centre 1 / neighbour -1, 'copy' neighbour 1, 'std' all 9."""
    positions = [(i, j) for i in range(3) for j in range(3)]
    neighbours = [p for p in positions if p != (1, 1)]
    if kind == "std":
        w = torch.zeros(9, 1, 3, 3)
        for c, (i, j) in enumerate(positions):
            w[c, 0, i, j] = 1
        return w
    w = torch.zeros(8, 1, 3, 3)
    for c, (i, j) in enumerate(neighbours):
        if kind == "aff":
            w[c, 0, 1, 1] = 1
            w[c, 0, i, j] = -1
        else:
            w[c, 0, i, j] = 1
    return w


def _local(x, kernel, dilations):
    b, k, h, w = x.shape
    x = x.reshape(b * k, 1, h, w)
    outs = [F.conv2d(F.pad(x, [d] * 4, mode="replicate"), kernel, dilation=d) for d in dilations]
    return torch.cat(outs, 1).view(b, k, -1, h, w)


def reference_pamr(img, mask, num_iter, dilations):
    mask = F.interpolate(mask, size=img.shape[-2:], mode="bilinear", align_corners=True)
    x_std = _local(img, _kernels("std"), dilations).std(2, keepdim=True)
    x = -_local(img, _kernels("aff"), dilations).abs() / (1e-8 + 0.1 * x_std)
    x = x.mean(1, keepdim=True).softmax(2)
    for _ in range(num_iter):
        mask = (_local(mask, _kernels("copy"), dilations) * x).sum(2)
    return mask


@pytest.mark.parametrize("num_iter,dilations,size", [(1, (1,), (20, 24)), (3, (1, 2), (31, 17)), (10, (8, 16), (40, 52))])
def test_pamr_matches_reference(num_iter, dilations, size):
    from ovseg_clip.pamr import pamr

    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, *size, generator=g)
    scores = torch.randn(2, 5, *size, generator=g)
    torch.testing.assert_close(pamr(img, scores, num_iter, dilations), reference_pamr(img, scores, num_iter, dilations), atol=1e-5, rtol=1e-5)
    low = torch.randn(2, 5, size[0] // 4, size[1] // 4, generator=g)  # scores resized to the image first
    torch.testing.assert_close(pamr(img, low, num_iter, dilations), reference_pamr(img, low, num_iter, dilations), atol=1e-5, rtol=1e-5)


def test_refiner_merges_windows_then_refines_and_helps():
    """Two-colour image, noisy window scores: the merged map gets PAMR and agrees more with the truth."""
    from ovseg_clip.pamr import pamr

    h, w = 96, 128
    truth = torch.zeros(h, w, dtype=torch.long)
    truth[:, 70:] = 1
    image = torch.stack([truth.float() * 0.8 + 0.1, 1 - truth.float() * 0.7, torch.full((h, w), 0.3)])
    boxes = sliding_windows(h, w, 64, 32)
    g = torch.Generator().manual_seed(0)
    windows = []
    for y1, y2, x1, x2 in boxes.tolist():
        t = F.one_hot(truth[y1:y2, x1:x2], 2).permute(2, 0, 1).float()
        t = F.interpolate(t[None], size=(4, 4), mode="area")[0]
        windows.append(t + 0.6 * torch.randn(2, 4, 4, generator=g))
    scores = torch.stack(windows)
    refiner = build_refiner("pamr")
    assert refiner.num_iter == 10 and refiner.dilations == (8, 16) and not refiner.needs_features
    out = refiner(image, boxes, scores, None)
    assert out.shape == (2, h, w)
    merged = merge_windows(scores, boxes, h, w)
    torch.testing.assert_close(out, pamr(image[None], merged[None], 10, (8, 16))[0])
    acc_before = (merged.argmax(0) == truth).float().mean()
    acc_after = (out.argmax(0) == truth).float().mean()
    assert acc_after > acc_before


def test_refiner_options():
    ref = build_refiner("pamr", num_iter=3, dilations=[2, 4])
    assert ref.dilations == (2, 4)
    with pytest.raises(ConfigError):
        build_refiner("pamr", dilations=[0])
    with pytest.raises(ConfigError):
        build_refiner("pamr", num_iter=-1)
