"""IoU and BoundaryIoU against an independent numpy/scipy computation written here."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from ovseg.evaluation.metrics import BoundaryIoU, IoU, _max_filter_1d, boundary_width

IGNORE = 255


# ---------------------------------------------------------------- independent reference (numpy/scipy)
def ref_iou(pairs, C, ignore=IGNORE):
    inter, union = np.zeros(C), np.zeros(C)
    for pred, gt in pairs:
        keep = gt != ignore
        p, g = pred[keep], gt[keep]
        for c in range(C):
            inter[c] += np.sum((p == c) & (g == c))
            union[c] += np.sum((p == c) | (g == c))
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / union


def ref_boundary(mask, d):
    """Boundary IoU paper's mask_to_boundary: mask minus erosion, outside the image is background."""
    eroded = ndimage.binary_erosion(mask, structure=np.ones((2 * d + 1, 2 * d + 1), bool), border_value=0)
    return mask & ~eroded


def ref_biou(pairs, C, ignore=IGNORE, ratio=0.02, d=None):
    inter, union = np.zeros(C), np.zeros(C)
    for pred, gt in pairs:
        pred = np.where(gt == ignore, ignore, pred)
        h, w = gt.shape
        dd = d if d is not None else max(1, int(round(ratio * math.sqrt(h * h + w * w))))
        for c in set(np.unique(gt)) | set(np.unique(pred)):
            if c == ignore:
                continue
            bg, bp = ref_boundary(gt == c, dd), ref_boundary(pred == c, dd)
            inter[c] += np.sum(bg & bp)
            union[c] += np.sum(bg | bp)
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / union


# ---------------------------------------------------------------- hand-made masks
def blob_pair(rng, h, w, C):
    """GT of rectangles/ellipses with an ignore blob; prediction shifted, noisy, with a pred-only class."""
    yy, xx = np.mgrid[:h, :w]
    gt = np.zeros((h, w), np.int64)
    for c in (1, 2, 3):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(h / 8, h / 3), rng.uniform(w / 8, w / 3)
        gt[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = c
    gt[h // 3 : h // 3 + h // 6, : w // 5] = IGNORE
    pred = np.roll(gt, (rng.integers(-3, 4), rng.integers(-3, 4)), axis=(0, 1))
    pred[pred == IGNORE] = rng.integers(0, 4)  # arbitrary predictions inside the ignore region
    noise = rng.random((h, w)) < 0.03
    pred[noise] = rng.integers(0, 4, noise.sum())
    pred[-h // 8 :, -w // 8 :] = 4  # class 4 only in predictions
    return pred, gt  # class 5 absent everywhere


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(0)
    sizes = [(75, 100), (97, 131), (64, 200), (12, 16), (150, 111)]
    return [blob_pair(rng, h, w, 6) for h, w in sizes]


def run(metric, pairs):
    for pred, gt in pairs:
        metric.update(torch.from_numpy(pred), torch.from_numpy(gt))
    return metric.compute()


def test_iou_hand_computed():
    pred = torch.tensor([[0, 0, 1], [1, 2, 2]])
    gt = torch.tensor([[0, 1, 1], [1, 255, 0]])
    m = IoU(4)
    m.update(pred, gt)
    out = m.compute()
    # class 0: I=1, U={p:(0,0),(0,1) g:(0,0),(1,2)} = 3; class 1: I=2 U=3; class 2 (pred only, at
    # a valid pixel (1,2)): I=0 U=1; class 3: absent -> NaN; (1,1) is ignored.
    torch.testing.assert_close(out["per_class"], torch.tensor([1 / 3, 2 / 3, 0.0, math.nan], dtype=torch.float64), equal_nan=True)
    assert out["mean"].item() == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)


def test_iou_matches_reference(pairs):
    out = run(IoU(6), pairs)
    expected = ref_iou(pairs, 6)
    np.testing.assert_allclose(out["per_class"].numpy(), expected, rtol=1e-12)
    assert np.isnan(expected[5]) and expected[4] == 0  # absent class NaN, pred-only class 0
    assert out["mean"].item() == pytest.approx(np.nanmean(expected), rel=1e-12)


def test_biou_matches_reference(pairs):
    out = run(BoundaryIoU(6), pairs)
    expected = ref_biou(pairs, 6)
    np.testing.assert_allclose(out["per_class"].numpy(), expected, rtol=1e-12)
    assert np.isnan(expected[5]) and expected[4] == 0
    assert out["mean"].item() == pytest.approx(np.nanmean(expected), rel=1e-12)


def test_biou_wide_boundary_and_chunking(pairs):
    """A large dilation ratio (d near the image size) and one class per erosion batch."""
    ref = ref_biou(pairs, 6, ratio=0.1)
    small = BoundaryIoU(6, dilation_ratio=0.1, max_elements=1)
    np.testing.assert_allclose(run(small, pairs)["per_class"].numpy(), ref, rtol=1e-12)


def test_boundary_width_rounds_half_to_even():
    assert boundary_width(75, 100, 0.02) == 2  # 0.02 * 125 = 2.5 -> 2
    assert boundary_width(30, 40, 0.07) == 4  # 0.07 * 50 = 3.5 -> 4
    assert boundary_width(12, 16, 0.02) == 1  # 0.4 -> 0, clamped to 1
    assert boundary_width(1024, 2048, 0.02) == 46


def test_biou_uses_half_to_even_width():
    rng = np.random.default_rng(1)
    pair = blob_pair(rng, 75, 100, 6)
    out = run(BoundaryIoU(6), [pair])["per_class"].numpy()
    np.testing.assert_allclose(out, ref_biou([pair], 6, d=2), rtol=1e-12)
    assert not np.allclose(out, ref_biou([pair], 6, d=3), equal_nan=True)


def test_batched_update_equals_one_by_one(pairs):
    same = [p for p in pairs if p[1].shape == (75, 100)] + [blob_pair(np.random.default_rng(2), 75, 100, 6)]
    preds = torch.from_numpy(np.stack([p for p, _ in same]))
    gts = torch.from_numpy(np.stack([g for _, g in same]))
    for cls in (IoU, BoundaryIoU):
        a, b = cls(6), cls(6)
        a.update(preds, gts)
        out_b = run(b, same)
        torch.testing.assert_close(a.compute()["per_class"], out_b["per_class"], equal_nan=True)


def test_max_filter_equals_max_pool():
    x = torch.rand(3, 9, 70) > 0.8
    for k in range(1, 40, 2):
        pooled = F.max_pool2d(x.to(torch.uint8), (1, k), stride=1).bool()
        assert torch.equal(_max_filter_1d(x, k, dim=2), pooled), k
        pooled = F.max_pool2d(x.transpose(1, 2).to(torch.uint8), (1, min(k, 9)), stride=1).bool().transpose(1, 2)
        assert torch.equal(_max_filter_1d(x, min(k, 9), dim=1), pooled), k


def test_all_ignore_and_no_update_give_nan():
    m = IoU(3)
    m.update(torch.zeros(4, 4, dtype=torch.long), torch.full((4, 4), 255))
    out = m.compute()
    assert torch.isnan(out["per_class"]).all() and torch.isnan(out["mean"])


@pytest.mark.parametrize("cls", [IoU, BoundaryIoU])
def test_validation_errors(cls):
    m = cls(3)
    with pytest.raises(ValueError, match="same shape"):
        m.update(torch.zeros(4, 5, dtype=torch.long), torch.zeros(5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target .*outside.*: 3, 7"):
        m.update(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 3], [7, 255]]))
    with pytest.raises(ValueError, match=r"preds .*: -1"):
        m.update(torch.tensor([[0, -1], [1, 2]]), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        m.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        m.update(torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long))


def test_ignored_prediction_counts_as_miss():
    m = IoU(2)
    m.update(torch.tensor([[255, 1]]), torch.tensor([[0, 1]]))
    torch.testing.assert_close(m.compute()["per_class"], torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_deterministic_mode_works():
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        m = IoU(3)
        m.update(torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, 1]]))
        assert m.compute()["mean"].item() == pytest.approx((1 + 0.5 + 0) / 3)
    finally:
        torch.use_deterministic_algorithms(prev)


# ---------------------------------------------------------------- DDP (2 CPU processes, gloo)
def _ddp_worker(rank, world, port, pairs, out_path):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        iou, biou = IoU(6), BoundaryIoU(6)
        for pred, gt in pairs[rank::world]:
            iou.update(torch.from_numpy(pred), torch.from_numpy(gt))
            biou.update(torch.from_numpy(pred), torch.from_numpy(gt))
        result = {"iou": iou.compute()["per_class"], "biou": biou.compute()["per_class"]}
        torch.save(result, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_sync_equals_single_process(pairs, tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, pairs, str(tmp_path / "out")), nprocs=2, join=True)
    single_iou, single_biou = run(IoU(6), pairs)["per_class"], run(BoundaryIoU(6), pairs)["per_class"]
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}")
        assert torch.equal(got["iou"].isnan(), single_iou.isnan())
        torch.testing.assert_close(got["iou"], single_iou, equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(got["biou"], single_biou, equal_nan=True, rtol=0, atol=0)


def test_functional_twins_equal_the_metrics_and_their_examples_run():
    """`mean_iou` / `boundary_iou` on a batch equal the metrics fed image by image; the docstring examples hold."""
    import doctest

    import ovseg.evaluation.metrics as metrics
    from ovseg.evaluation.metrics import boundary_iou, mean_iou

    g = torch.Generator().manual_seed(5)
    preds = torch.randint(0, 4, (3, 30, 40), generator=g)
    target = torch.randint(0, 4, (3, 30, 40), generator=g)
    target[:, :5] = 255
    iou, biou = IoU(4), BoundaryIoU(4)
    for p, t in zip(preds, target):
        iou.update(p, t)
        biou.update(p, t)
    for functional, metric in ((mean_iou(preds, target, 4), iou.compute()), (boundary_iou(preds, target, 4), biou.compute())):
        torch.testing.assert_close(functional["per_class"], metric["per_class"], equal_nan=True)
    with pytest.raises(ValueError, match="outside"):
        mean_iou(preds, target + 10, 4)
    result = doctest.testmod(metrics, verbose=False)
    assert result.attempted >= 3 and result.failed == 0
