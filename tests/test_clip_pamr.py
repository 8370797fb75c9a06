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


def test_pamr_in_class_chunks_equals_one_chunk(monkeypatch):
    """Classes are refined in cache-sized chunks; each class is independent, so chunks change nothing."""
    from ovseg_clip import pamr as module

    g = torch.Generator().manual_seed(1)
    img = torch.rand(2, 3, 30, 41, generator=g)
    scores = torch.randn(2, 7, 30, 41, generator=g)
    whole = module.pamr(img, scores, 3, (1, 2))
    monkeypatch.setattr(module, "CHUNK_BYTES", 2 * 30 * 41 * 4 * 3)  # chunks of 3, 3 and 1 classes
    assert torch.equal(module.pamr(img, scores, 3, (1, 2)), whole)
    torch.testing.assert_close(whole, reference_pamr(img, scores, 3, (1, 2)), atol=1e-5, rtol=1e-5)


def _two_colour_case():
    """Two-colour image and noisy 4x4 window scores of its truth."""
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
    return image, truth, boxes, torch.stack(windows)


def _naclip_guide(image: torch.Tensor, size=None) -> torch.Tensor:
    """NACLIP's PAMR guide: its model input (the uint8 image normalised with mmseg's CLIP statistics),
    upsampled bilinearly to the logits' size."""
    mean = torch.tensor([122.771, 116.746, 104.094]).view(1, 3, 1, 1)
    std = torch.tensor([68.501, 66.632, 70.323]).view(1, 3, 1, 1)
    guide = ((image[None] * 255).round() - mean) / std
    return guide if size is None else F.interpolate(guide, size=size, mode="bilinear", align_corners=False)


def test_refiner_at_resized_size_refines_the_merged_map_and_helps():
    """`at: resized`: PAMR on the merged map at the resized size; it agrees more with the truth."""
    image, truth, boxes, scores = _two_colour_case()
    refiner = build_refiner("pamr", at="resized")
    assert refiner.num_iter == 10 and refiner.dilations == (8, 16) and not refiner.needs_features
    out = refiner(image, boxes, scores, None)
    assert out.shape == (2, *truth.shape)
    merged = merge_windows(scores, boxes, *truth.shape)
    torch.testing.assert_close(out, reference_pamr(_naclip_guide(image), merged[None], 10, (8, 16))[0])
    assert (out.argmax(0) == truth).float().mean() > (merged.argmax(0) == truth).float().mean()
    assert torch.equal(refiner.refine_output(image, merged), merged)  # nothing after the final resize


def test_refiner_at_original_size_runs_after_the_final_resize_as_naclip():
    """Default `at: original` (NACLIP's `predict`): the windows are merged untouched, the logits resized to
    the original size, and PAMR guided by NACLIP's normalised input upsampled (bilinear) to that size."""
    image, truth, boxes, scores = _two_colour_case()
    image = (image * 255).round() / 255  # an 8-bit image, as the data path delivers
    refiner = build_refiner("pamr")
    assert refiner.at == "original"
    merged = merge_windows(scores, boxes, *truth.shape)
    assert torch.equal(refiner(image, boxes, scores, None), merged)  # no canvas step
    original = (150, 200)
    logits = F.interpolate(merged[None], size=original, mode="bilinear", align_corners=False)
    expected = reference_pamr(_naclip_guide(image, original), logits, 10, (8, 16))[0]
    torch.testing.assert_close(refiner.refine_output(image, logits[0]), expected, atol=1e-5, rtol=1e-5)
    # the image's third channel is flat: guiding with the [0, 1] image instead is NOT the same there
    unnormalised = F.interpolate(image[None], size=original, mode="bilinear", align_corners=False)
    assert (reference_pamr(unnormalised, logits, 10, (8, 16))[0] - expected).abs().max() > 1e-2


def test_refiner_options():
    ref = build_refiner("pamr", num_iter=3, dilations=[2, 4])
    assert ref.dilations == (2, 4)
    with pytest.raises(ConfigError):
        build_refiner("pamr", dilations=[0])
    with pytest.raises(ConfigError):
        build_refiner("pamr", num_iter=-1)
    with pytest.raises(ConfigError, match="at must be one of original, resized"):
        build_refiner("pamr", at="before")
