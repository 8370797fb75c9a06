"""ResCLIP against an independent computation from its formulas (yvhangyang/ResCLIP 0e085f7, `clip/model.py`).

The reference works image by image on the state-dict tensors: Python loops over patch pairs and path samples
(numpy float32, as the authors' float32 torch code), `torch.mode` for patch labels, `np.convolve` for the row
smoothing, the PAMR port of `test_clip_pamr`. Each detail the authors' code fixes is a switch (`trap`); the
tests that flip one show the flip moves the result beyond the tolerance the predictor meets.

Maps are compared in float64 (the SFR labels come from thresholds and argmaxes: in float64 two correct codes
do not land on opposite sides of them); float32 itself is compared with the authors' code.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg import build_predictor
from ovseg.errors import ConfigError
from ovseg.pipeline.vocabulary import Vocabulary
from tests.clip12 import HEADS, LAYERS, bfloat16_scores, block, block_name, embed, final_features, fixtures, normalised
from tests.test_clip_pamr import reference_pamr
from tests.test_clip_predictors import _images, gaussian_bias, mlp, out_proj, qkv

NAMES = ["cat", "dog, puppy", "sky", "grass"]
VOCAB = Vocabulary(NAMES)
TOL = 1e-6
KNOBS = dict(temp_thd=0.3, attn_rcs_weights=(2.0, 0.3), attn_sfr_weights=(1.8, 0.7))


ckpt12, ref_sd, text = fixtures(NAMES)


def _predictor(ckpt, **kw):
    pred = build_predictor("resclip", pretrained=ckpt, templates="single", **{**KNOBS, **kw}).double()
    pred.set_classes(NAMES)
    return pred


def images64(h, w, b=1, seed=1):
    return _images(h, w, b=b, seed=seed).double()


# ------------------------------------------------------------------------------------------
# reference: SFR


@lru_cache(maxsize=None)
def path_samples(grid, traps=()):
    """For every pair (i, j): the flat indices of the checked samples of the segment i -> j."""
    h, w = grid
    coords = [(i // w, i % w) for i in range(h * w)]
    m = max(max(h, w) - 1, 1)
    t = torch.linspace(0, 1, m + 1).numpy()  # float32, as `check_path`
    one = np.float32(1)
    out = {}
    for i, (r0, c0) in enumerate(coords):
        for j, (r1, c1) in enumerate(coords):
            d = max(abs(r1 - r0), abs(c1 - c0))
            ts = np.linspace(0, 1, d + 1, dtype=np.float32) if "full_segment" in traps else t[: d + 1]
            pts = []
            for tk in ts:
                r = np.float32(r0) * (one - tk) + np.float32(r1) * tk
                c = np.float32(c0) * (one - tk) + np.float32(c1) * tk
                rnd = (lambda v: np.floor(v + np.float32(0.5))) if "round_half_up" in traps else np.rint
                pts.append(int(rnd(r)) * w + int(rnd(c)))
            out[i, j] = (d, pts)
    return out


def ref_patch_labels(probs, grid, temp_thd, traps=(), vocab=VOCAB):
    """probs (Q, H, W) of names -> (N,) patch labels (row-major)."""
    if "class_argmax" in traps:  # reduce synonyms first: labels become class indices
        probs = torch.stack([probs[vocab.name_to_class == c].max(0).values for c in range(int(vocab.name_to_class.max()) + 1)])
    best, lab = probs.max(0)
    below = len(probs) if "below_own_label" in traps else 0
    lab = torch.where(best < temp_thd, torch.full_like(lab, below), lab)
    h, w = grid
    out = []
    for r in range(h):
        for c in range(w):
            block_ = lab[16 * r : 16 * r + 16, 16 * c : 16 * c + 16].flatten()
            if "mode_largest" in traps:
                counts = torch.bincount(block_)
                out.append(int(torch.nonzero(counts == counts.max()).max()))
            else:
                out.append(int(torch.mode(block_).values))
    return torch.tensor(out)


def ref_sfr(labels, grid, std, dse=True, traps=()):
    """(N + 1, N + 1) float32 semantic feedback matrix."""
    n = len(labels)
    lab = labels.tolist()
    s = np.zeros((n, n), np.float32)
    samples = path_samples(tuple(grid), tuple(t for t in traps if t in ("full_segment", "round_half_up")))
    m = max(grid) - 1
    for i in range(n):
        for j in range(n):
            if lab[i] != lab[j]:
                continue
            d, pts = samples[i, j]
            valid = all(lab[p] == lab[i] for p in pts)
            s[i, j] = 1.0 if valid or not dse else np.float32(np.exp(np.float32(-d / m)))
    if "no_smoothing" not in traps:
        size = min(n, int(6 * std + 1))
        size += 1 - size % 2
        x = np.arange(size) - size // 2
        kernel = np.exp(-(x**2) / (2 * std**2)).astype(np.float32)
        kernel /= kernel.sum()
        s = np.stack([np.convolve(row, kernel, mode="same") for row in s]).astype(np.float32)
    s = np.maximum(s, 0)
    s = s / (s.sum(1, keepdims=True) + np.float32(1e-8))
    out = np.zeros((n + 1, n + 1), np.float32)
    out[1:, 1:] = s
    return torch.from_numpy(out)


# ------------------------------------------------------------------------------------------
# reference: the forward pass


def pamr64(image, scores):
    """The PAMR port of `test_clip_pamr` (10 iterations, dilations 8 and 16) with float64 kernels."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return reference_pamr(image, scores, 10, (8, 16))
    finally:
        torch.set_default_dtype(previous)


def ref_resclip(sd, images, text, base="naclip", std=5.0, temp_thd=0.3, logit_scale=40.0, rcs_w=(2.0, 0.3),
                sfr_w=(1.8, 0.7), dse=True, use_rcs=True, use_sfr=True, traps=(), vocab=VOCAB):
    """(B, Q, h, w) raw cosines, each image on its own (unless `batch_sfr_max` shares the SFR maximum)."""
    hh, ww = images.shape[-2:]
    h, w = hh // 16, ww // 16
    full = normalised(images)
    name = block_name(LAYERS - 1)
    layers = (4, 5, 6, 7) if "rcs_4_7" in traps else (5, 6, 7, 8)
    states, sfrs = [], []
    for b in range(len(images)):
        tok, grid = embed(sd, full[b : b + 1, :, : 16 * h, : 16 * w])
        maps = []
        for i in range(LAYERS - 1):
            tok, a = block(sd, tok, i)
            if i in layers:
                maps.append(a)
        rcs = torch.stack(maps).mean(0) if use_rcs else None
        if rcs is not None and "rcs_heads_mean" in traps:
            rcs = rcs.mean(1, keepdim=True)
        states.append((tok, rcs))

    def last(tok, rcs, sfr, sfr_max):
        q, k, v = qkv(tok, sd, name, HEADS)
        s = q.shape[-1] ** -0.5

        def mix(z):
            if sfr is None:
                return z
            tau, lam = sfr_w
            scaled = sfr / sfr_max
            lam_s = lam * scaled if "sfr_float32" in traps else lam * scaled.half()
            return tau * ((1 - lam) * z + lam_s.to(z.dtype))

        if base == "naclip":
            a = (mix(k @ k.transpose(-1, -2) * s) + gaussian_bias(h, w, std).to(k.dtype)).softmax(-1)
        elif base == "clearclip":
            a = mix(q @ q.transpose(-1, -2) * s).softmax(-1)
        elif base == "sclip":
            a = mix(q @ q.transpose(-1, -2) * s).softmax(-1) + mix(k @ k.transpose(-1, -2) * s).softmax(-1)
        else:
            a = mix((q * s) @ k.transpose(-1, -2)).softmax(-1)
        if rcs is not None:
            tau, lam = rcs_w
            a = ((1 - lam) * a + lam * rcs) * (1.0 if "rcs_no_tau" in traps else tau)
        y = out_proj(a @ v, sd, name)
        if base in ("sclip", "clip"):
            y = tok + y
            y = y + mlp(y, sd, name)
        return (final_features(sd, y[:, 1:])[0] @ text.T).T.reshape(-1, h, w)

    for b, (tok, rcs) in enumerate(states):
        if not use_sfr:
            sfrs.append(None)
            continue
        cos = F.interpolate(last(tok, rcs, None, None)[None], size=(hh, ww), mode="bilinear", align_corners=False)
        scale = 50.0 if "sfr_scale_50" in traps else logit_scale
        guide = full[b : b + 1]
        if "pamr_after_softmax" in traps:
            probs = pamr64(guide, (cos * scale).softmax(1))[0]
        else:
            refined = cos if "no_pamr" in traps else pamr64(guide, cos)
            probs = (refined * scale).softmax(1)[0]
        sfrs.append(ref_sfr(ref_patch_labels(probs, (h, w), temp_thd, traps, vocab), (h, w), std, dse, traps))
    maxima = [None if m is None else m.max() for m in sfrs]
    if "batch_sfr_max" in traps:
        maxima = [max(maxima)] * len(sfrs)
    out = [last(tok, rcs, sfr, mx) for (tok, rcs), sfr, mx in zip(states, sfrs, maxima)]
    return torch.stack(out).float()


# ------------------------------------------------------------------------------------------
# tests: the whole forward pass


@pytest.mark.parametrize("base", ["naclip", "sclip", "clearclip", "clip"])
@pytest.mark.parametrize("size", [(128, 192), (140, 206)])
def test_scores_match_the_formulas(ckpt12, ref_sd, text, base, size):
    """Every base; a window that is a multiple of 16 and one whose remainder the floor grid drops (SFR's PAMR
    still sees the whole window, its labels only the grid's pixels)."""
    pred = _predictor(ckpt12, base=base)
    images = images64(*size, b=1, seed=4)
    got = pred(images)
    assert got.shape == (1, 5, size[0] // 16, size[1] // 16) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref_resclip(ref_sd, images, text, base=base), atol=TOL, rtol=0)


def test_non_default_knobs_and_the_224_window(ckpt12, ref_sd, text):
    knobs = dict(gaussian_std=3.0, temp_thd=0.2, logit_scale=50.0, attn_rcs_weights=[1.5, 0.5],
                 attn_sfr_weights=[2.5, 0.4], delete_same_entity=False)
    pred = _predictor(ckpt12, **knobs)
    images = images64(224, 224, b=1, seed=6)
    want = ref_resclip(ref_sd, images, text, std=3.0, temp_thd=0.2, logit_scale=50.0, rcs_w=(1.5, 0.5),
                       sfr_w=(2.5, 0.4), dse=False)
    torch.testing.assert_close(pred(images), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("parts", [dict(use_rcs=False), dict(use_sfr=False), dict(use_rcs=False, use_sfr=False)])
def test_rcs_and_sfr_really_switch_off(ckpt12, ref_sd, text, parts):
    """The authors' segmentor stores use_rcs/use_sfr as 1-tuples (always on); here they switch the parts off."""
    images = images64(128, 192, seed=4)
    got = _predictor(ckpt12, **parts)(images)
    torch.testing.assert_close(got, ref_resclip(ref_sd, images, text, **parts), atol=TOL, rtol=0)
    assert (got - ref_resclip(ref_sd, images, text)).abs().max() > 1e-3


TRAPS = {
    "rcs_4_7": {}, "rcs_heads_mean": {}, "rcs_no_tau": {}, "no_pamr": {}, "pamr_after_softmax": {}, "no_smoothing": {},
    # the softmax temperature and the below-threshold label only matter where pixels fall below temp_thd
    "sfr_scale_50": dict(temp_thd=0.9, seed=4), "below_own_label": dict(temp_thd=0.9),
    # labels are names: with puppy and sky synonyms of one class, a class argmax would merge their patches
    "class_argmax": dict(classes=["cat", "dog", "puppy, sky", "grass"], seed=4),
}


@pytest.mark.parametrize("trap", TRAPS)
def test_each_detail_of_the_authors_code_is_discriminative(ckpt12, ref_sd, text, trap):
    knobs = dict(TRAPS[trap])
    vocab = Vocabulary(knobs.pop("classes", NAMES))
    assert vocab.names == VOCAB.names  # same queries, same text embeddings
    images = images64(128, 192, seed=knobs.pop("seed", 8))
    pred = _predictor(ckpt12, **knobs)
    pred.set_classes(vocab)
    got = pred(images)
    torch.testing.assert_close(got, ref_resclip(ref_sd, images, text, vocab=vocab, **knobs), atol=TOL, rtol=0)
    assert (ref_resclip(ref_sd, images, text, traps=(trap,), vocab=vocab, **knobs) - got).abs().max() > 5 * TOL


def test_each_window_of_a_batch_is_computed_on_its_own(ckpt12, ref_sd, text):
    """Coarse map, SFR matrix and its maximum are per window; a maximum over the batch would differ."""
    pred = _predictor(ckpt12)
    images = torch.cat([images64(128, 192, seed=s) for s in (4, 8, 9)])
    batched = pred(images)
    single = torch.cat([pred(images[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=0)
    torch.testing.assert_close(batched, ref_resclip(ref_sd, images, text), atol=TOL, rtol=0)
    assert (ref_resclip(ref_sd, images, text, traps=("batch_sfr_max",)) - batched).abs().max() > 5 * TOL


# ------------------------------------------------------------------------------------------
# tests: SFR pieces


def test_patch_labels_first_name_below_the_threshold_smallest_mode_top_left_pixels():
    from ovseg_clip.resclip import patch_labels

    probs = torch.zeros(1, 4, 40, 36)  # 4 names, 2x2 patches; the 8-row and 4-column remainders are not read
    probs[0, 2, :16, :16] = 0.9  # patch 0: name 2 on 160 pixels, name 3 on 96
    probs[0, 3, :6, :16] = 0.95
    probs[0, 1, :16, 16:32] = 0.5  # patch 1: every pixel below temp_thd -> label 0 (the first name)
    probs[0, 3, 16:24, :16] = 0.8  # patch 2: 128 pixels of name 3, 128 of name 1 -> the smaller label
    probs[0, 1, 24:32, :16] = 0.8
    probs[0, 2, 16:32, 16:32] = 0.7  # patch 3: name 2
    probs[0, 3, 32:] = 0.99
    probs[0, 3, :, 32:] = 0.99
    got = patch_labels(probs, (2, 2), 16, temp_thd=0.6)
    assert got.tolist() == [[2, 0, 1, 2]] == [ref_patch_labels(probs[0], (2, 2), 0.6).tolist()]
    assert ref_patch_labels(probs[0], (2, 2), 0.6, traps=("mode_largest",)).tolist() == [2, 0, 3, 2]
    assert ref_patch_labels(probs[0], (2, 2), 0.6, traps=("below_own_label",)).tolist() == [2, 4, 1, 2]


@pytest.mark.parametrize("grid", [(6, 9), (8, 8), (5, 12)])
def test_path_check_samples_the_first_d_over_m_of_each_segment_rounding_half_to_even(grid):
    """Samples t_k = k / M for k <= d (not the whole segment); exact halves (even M) round to even."""
    from ovseg_clip.resclip import path_valid

    n = grid[0] * grid[1]
    labels = torch.randint(0, 3, (2, n), generator=torch.Generator().manual_seed(sum(grid)))
    got = path_valid(labels, grid)

    def want(b, traps=()):
        lab, samples = labels[b].tolist(), path_samples(grid, traps)
        return torch.tensor([[all(lab[p] == lab[i] for p in samples[i, j][1]) for j in range(n)] for i in range(n)])

    assert all(torch.equal(got[b], want(b)) for b in range(2))
    assert any(not torch.equal(got[b], want(b, ("full_segment",))) for b in range(2))
    if (max(grid) - 1) % 2 == 0:
        assert any(not torch.equal(got[b], want(b, ("round_half_up",))) for b in range(2))


def test_path_check_chunks_give_the_same_answer(monkeypatch):
    from ovseg_clip import resclip

    labels = torch.randint(0, 2, (3, 7 * 11), generator=torch.Generator().manual_seed(0))
    whole = resclip.path_valid(labels, (7, 11))
    monkeypatch.setattr(resclip, "_PATH_CHUNK_ELEMENTS", 1000)
    assert torch.equal(resclip.path_valid(labels, (7, 11)), whole)


@pytest.mark.parametrize("dse", [True, False])
def test_sfr_matrix_matches_the_formula(dse):
    from ovseg_clip.resclip import sfr_matrix

    grid = (6, 9)
    labels = torch.randint(0, 3, (1, 54), generator=torch.Generator().manual_seed(3))
    got = sfr_matrix(labels, grid, 5.0, dse)[0]
    assert got.shape == (55, 55) and got[0].abs().max() == 0 and got[:, 0].abs().max() == 0
    torch.testing.assert_close(got, ref_sfr(labels[0], grid, 5.0, dse), atol=1e-7, rtol=0)
    assert (ref_sfr(labels[0], grid, 5.0, dse, traps=("no_smoothing",)) - got).abs().max() > 1e-3
    if dse:
        assert (ref_sfr(labels[0], grid, 5.0, False) - got).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------
# tests: options


def test_options_are_validated(ckpt12):
    with pytest.raises(ConfigError, match="rcs_layers must be a block index between 0 and 10 for this 12-layer"):
        build_predictor("resclip", pretrained=ckpt12, templates="single", rcs_layers=[5, 11])
    with pytest.raises(ConfigError, match="rcs_layers must be a block index between 0 and 0 for this 2-layer"):
        build_predictor("resclip", model="ovseg-tiny-vit", pretrained="random", templates="single")
    pred = build_predictor("resclip", model="ovseg-tiny-vit", pretrained="random", templates="single", rcs_layers=[0])
    assert pred.rcs_layers == (0,)
    pred = build_predictor("resclip", model="ovseg-tiny-vit", pretrained="random", templates="single", use_rcs=False)
    with pytest.raises(ConfigError, match="rcs_layers must be a block index"):
        pred.configure(use_rcs=True)
    assert pred.use_rcs is False
    with pytest.raises(ConfigError, match="base must be one of naclip, sclip, clearclip, clip"):
        build_predictor("resclip", pretrained=ckpt12, templates="single", base="maskclip")
    with pytest.raises(ConfigError, match="grid must be floor"):
        build_predictor("resclip", pretrained=ckpt12, templates="single", grid="pad")
    pred = build_predictor("resclip", pretrained=ckpt12, templates="single")
    assert (pred.base, pred.temp_thd, pred.attn_rcs_weights, pred.attn_sfr_weights) == ("naclip", 0.1, (2.0, 0.6), (2.1, 0.6))
    with pytest.raises(ConfigError, match=r"attn_sfr_weights\[1\] \(lambda\) must be at most 1.0"):
        pred.configure(temp_thd=0.5, attn_sfr_weights=[2.0, 1.5])
    assert pred.temp_thd == 0.1 and pred.attn_sfr_weights == (2.1, 0.6)  # rolled back together
    with pytest.raises(ConfigError, match="attn_rcs_weights must be a pair"):
        pred.configure(attn_rcs_weights=2.0)
    with pytest.raises(ConfigError, match="use_sfr must be true or false"):
        pred.configure(use_sfr="yes")
    pred.configure(temp_thd=0.5, attn_rcs_weights=[2.0, 0.3], base="clearclip")
    assert pred.attn_rcs_weights == (2.0, 0.3) and pred.last_block.name == "clearclip"


def test_bfloat16_runs_and_stays_close():
    pred = build_predictor("resclip", model="ovseg-tiny-vit-12", pretrained="random", templates="single", use_sfr=False)
    images = _images(128, 192, b=2)
    ref, out = bfloat16_scores(pred, NAMES, images)
    assert torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1] > 0.99
    pred.configure(use_sfr=True)  # the SFR path (float16 S', PAMR in float32) runs in bfloat16 too
    assert torch.isfinite(pred(images)).all()
