"""SC-CLIP against an independent computation from its formulas (SuleBai/SC-CLIP 0417ba9, `clip/model.py`).

The reference below works image by image on the state-dict tensors (loops over outliers and images, numpy's
quantile), and every detail the authors' code fixes is a switch (`trap`): each test that flips one shows the
flip moves the map beyond the tolerance, so a predictor with that mistake would fail.

Both sides run in float64: the method thresholds N² similarities (β, the mean of S_mid) and LOF scores, so two
correct float32 codes that round differently can land on opposite sides of a threshold (~1e-4 on a map); in
float64 they do not, and the tolerance can be tight. Float32 itself is compared with the authors' code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg import build_predictor
from ovseg.errors import ConfigError
from tests.clip12 import HEADS, LAYERS, bfloat16_scores, block, block_name, embed, final_features, fixtures, normalised
from tests.test_clip_predictors import _images, ln, out_proj, qkv, ref_pos

NAMES = ["cat", "dog, puppy", "sky", "grass"]
TOL = 1e-6


def images64(h, w, b=1, seed=1):
    return _images(h, w, b=b, seed=seed).double()


ckpt12, ref_sd, text = fixtures(NAMES)


def _predictor(ckpt, **kw):
    pred = build_predictor("scclip", pretrained=ckpt, templates="single", **kw).double()
    pred.set_classes(NAMES)
    return pred


# ------------------------------------------------------------------------------------------
# reference


def ref_lof(x, k=30, contamination=0.05, traps=()):
    """Outlier mask (N,) of tokens x (N, D): LOF with the token's own k-distance, squared distances,
    linear quantile, strictly above it."""
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    if "unsquared" in traps:
        d = d.sqrt()
    others = d + torch.diag(torch.full((len(x),), float("inf")))
    nn = others.argsort(dim=1)[:, :k]
    kd = others.gather(1, nn)[:, -1]
    if "textbook_lof" in traps:  # reachability with the neighbour's k-distance
        lrd = 1.0 / torch.maximum(others.gather(1, nn), kd[nn]).mean(1)
    else:
        lrd = 1.0 / kd
    lof = (lrd[nn] / lrd[:, None]).mean(1)
    method = "higher" if "quantile_higher" in traps else "linear"
    threshold = float(np.quantile(lof.double().numpy(), 1 - contamination, method=method))
    return lof >= threshold if "non_strict" in traps else lof > threshold


def ref_repair(t, outliers, grid, traps=()):
    """Each outlier (row-major flat index) -> mean of its in-grid, non-outlier 8-neighbours."""
    h, w = grid
    out = t.clone()
    flagged = set(torch.nonzero(outliers).flatten().tolist())
    for i in flagged:
        r, c = (i % h, i // h) if "column_major" in traps else (i // w, i % w)
        neigh = [
            (r + dr) * w + (c + dc)
            for dr in (-1, 0, 1) for dc in (-1, 0, 1)
            if (dr or dc) and 0 <= r + dr < h and 0 <= c + dc < w and (r + dr) * w + (c + dc) not in flagged
        ]
        if neigh:
            out[r * w + c] = t[neigh].mean(0)
    return out


def rownorm_thresholded(s, beta):
    s = torch.where(s < beta, torch.zeros_like(s), s)
    return s / (s.sum(-1, keepdim=True) + 1e-6)


def cos_matrix(t):
    t = t / t.norm(dim=-1, keepdim=True)
    return t @ t.T


def ref_scclip(sd, images, text, pre=8, post=3, ms=3, me=10, res_cls=0.3, beta=0.4, traps=()):
    """(B, Q, h, w) raw cosines; everything per image unless the `batch_mean` trap shares S_mid's mean."""
    hh, ww = images.shape[-2] // 16 * 16, images.shape[-1] // 16 * 16
    x = normalised(images)[..., :hh, :ww]
    if "size_pos" in traps:
        tok = F.conv2d(x, sd["visual.conv1.weight"], stride=16)
        grid = tuple(tok.shape[-2:])
        tok = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), tok.flatten(2).transpose(1, 2)], 1)
        tok = ln(tok + ref_pos(sd, grid, "size"), sd, "visual.ln_pre")
    else:
        tok, grid = embed(sd, x)
    outs = []
    for i in range(LAYERS - 1):
        tok, _ = block(sd, tok, i)
        outs.append(tok)
    if "pre_plus1" in traps:
        pre += 1
    if "post_plus1" in traps:
        post += 1
    if "end_inclusive" in traps:
        me += 1
    if "beta03" in traps:
        beta = 0.3
    last = block_name(LAYERS - 1)
    s_mids = []
    for b in range(len(x)):
        outl = ref_lof(outs[-1][b, 1:], traps=traps)
        if "no_repair" in traps:
            outl = torch.zeros_like(outl)
        s_mids.append(cos_matrix(ref_repair(outs[pre][b, 1:], outl, grid, traps)))
    means = [torch.stack(s_mids).mean()] * len(x) if "batch_mean" in traps else [s.mean() for s in s_mids]
    result = []
    for b in range(len(x)):
        outl = ref_lof(outs[-1][b, 1:], traps=traps)
        if "no_repair" in traps:
            outl = torch.zeros_like(outl)
        s_mid = s_mids[b]
        factor = 2.0 if "factor2" in traps else 3.0
        m_src = torch.where(s_mid < beta, torch.zeros_like(s_mid), s_mid) if "thresholded_mid" in traps else s_mid
        m = (m_src - (m_src.mean() if "thresholded_mid" in traps else means[b])) * factor
        mid = torch.where(m < 0, torch.full_like(m, float("-inf")), m).softmax(-1)

        def attend(patches):
            _, k, v = qkv(patches[None], sd, last, HEADS)
            kk = (k @ k.transpose(-1, -2) * k.shape[-1] ** -0.5).softmax(-1)
            a = mid + kk if "sum_softmax" in traps else (mid + kk) / 2
            return out_proj(a @ v, sd, last)[0]

        cls = 0.0 if "no_res_cls" in traps else res_cls
        x_rep = ref_repair(outs[-1][b, 1:], outl, grid, traps)
        y = attend(rownorm_thresholded(s_mid, beta) @ x_rep) + cls * outs[-1][b, 0]
        f_post = outs[post][b, 1:]
        if "repair_post" in traps:
            f_post = ref_repair(f_post, outl, grid, traps)
        agg = rownorm_thresholded(cos_matrix(f_post), beta)
        fused = sum(outs[i][b] for i in range(ms, me))
        y = agg @ y + agg @ (attend(fused[1:]) + cls * fused[0])
        feats = final_features(sd, y)
        result.append((feats @ text.T).T.reshape(-1, *grid))
    return torch.stack(result).float()


# ------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("size", [(224, 224), (160, 240), (200, 290), (224, 336)])
def test_scores_match_the_formulas(ckpt12, ref_sd, text, size):
    """Square (no interpolation), non-square (row-major outliers), floor remainder, 14x21 (DINO-style table)."""
    pred = _predictor(ckpt12)
    assert (pred.pre_adjust_idx, pred.post_adjust_idx, pred.multi_start_idx, pred.multi_end_idx, pred.res_cls) == (8, 3, 3, 10, 0.3)
    images = images64(*size, b=2)
    got = pred(images)
    assert got.shape == (2, 5, size[0] // 16, size[1] // 16) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref_scclip(ref_sd, images, text), atol=TOL, rtol=0)


def test_non_default_knobs(ckpt12, ref_sd, text):
    knobs = dict(pre_adjust_idx=6, post_adjust_idx=2, multi_start_idx=2, multi_end_idx=9, res_cls=0.5)
    pred = _predictor(ckpt12, **knobs, beta=0.35)
    images = images64(224, 224, b=1, seed=3)
    want = ref_scclip(ref_sd, images, text, pre=6, post=2, ms=2, me=9, res_cls=0.5, beta=0.35)
    torch.testing.assert_close(pred(images), want, atol=TOL, rtol=0)
    pred.configure(pre_adjust_idx=10, multi_end_idx=11)  # the highest indices of a 12-layer tower
    want = ref_scclip(ref_sd, images, text, pre=10, post=2, ms=2, me=11, res_cls=0.5, beta=0.35)
    torch.testing.assert_close(pred(images), want, atol=TOL, rtol=0)


TRAPS = [
    "textbook_lof", "quantile_higher", "no_repair", "repair_post", "sum_softmax", "factor2",
    "thresholded_mid", "no_res_cls", "pre_plus1", "post_plus1", "end_inclusive", "beta03",
]


@pytest.mark.parametrize("trap", TRAPS)
def test_each_detail_of_the_authors_code_is_discriminative(ckpt12, ref_sd, text, trap):
    """Flipping one detail moves the map beyond the tolerance the predictor meets."""
    images = images64(224, 224, b=1, seed=5)
    got = _predictor(ckpt12)(images)
    torch.testing.assert_close(got, ref_scclip(ref_sd, images, text), atol=TOL, rtol=0)
    assert (ref_scclip(ref_sd, images, text, traps=(trap,)) - got).abs().max() > 5 * TOL


@pytest.mark.parametrize("size,trap", [((160, 240), "column_major"), ((224, 336), "size_pos"), ((144, 144), "non_strict")])
def test_grid_traps_are_discriminative(ckpt12, ref_sd, text, size, trap):
    """Non-square grids: outliers located row-major (the authors' code divides by the row count and fails
    there), positional table resampled DINO-style, not to the size; 81 patches: the 0.95 quantile is the 77th
    LOF itself, which is not an outlier (strictly above)."""
    images = images64(*size, b=1, seed=7)
    got = _predictor(ckpt12)(images)
    assert (ref_scclip(ref_sd, images, text, traps=(trap,)) - got).abs().max() > 5 * TOL


def test_each_window_of_a_batch_is_computed_on_its_own(ckpt12, ref_sd, text):
    """LOF, its quantile and the mean of S_mid are per window; one mean over the batch would differ."""
    pred = _predictor(ckpt12)
    images = torch.cat([images64(224, 224, b=1, seed=s) for s in (11, 12, 13)])
    batched = pred(images)
    single = torch.cat([pred(images[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=0)
    assert (ref_scclip(ref_sd, images, text, traps=("batch_mean",)) - batched).abs().max() > 5 * TOL


def test_grid_with_as_many_patches_as_the_table_keeps_it(ckpt12, ref_sd, text):
    """112x448 gives 7x28 = 196 patches: the authors compare token counts, so the 14x14 table is used as is."""
    images = images64(112, 448, b=1, seed=2)
    got = _predictor(ckpt12)(images)
    torch.testing.assert_close(got, ref_scclip(ref_sd, images, text), atol=TOL, rtol=0)
    assert (ref_scclip(ref_sd, images, text, traps=("size_pos",)) - got).abs().max() > 5 * TOL


def test_lof_matches_the_formula_and_its_traps_change_the_outliers():
    from ovseg_clip.scclip import lof_outliers

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 196, 16, generator=g) * torch.rand(2, 196, 1, generator=g) ** 2
    got = lof_outliers(x)
    assert got.shape == (2, 196) and int(got[0].sum()) == 10  # 196 tokens: 10 strictly above the 0.95 quantile
    for b in range(2):
        assert torch.equal(got[b], ref_lof(x[b]))
    for trap in ("textbook_lof", "unsquared", "quantile_higher"):
        assert any(not torch.equal(got[b], ref_lof(x[b], traps=(trap,))) for b in range(2)), trap
    assert int(lof_outliers(torch.randn(1, 294, 8, generator=g))[0].sum()) == 15
    x41 = torch.randn(1, 41, 8, generator=g)  # 0.95 * 40 = 38: the threshold is a LOF value, not an outlier
    assert int(lof_outliers(x41)[0].sum()) == 2 and int(ref_lof(x41[0], traps=("non_strict",)).sum()) == 3


def test_small_windows_skip_the_outlier_test(ckpt12, ref_sd, text):
    """<= 30 patches: no outliers (the authors' topk fails there); the rest of the method still runs."""
    from ovseg_clip.scclip import lof_outliers

    assert not lof_outliers(torch.randn(1, 30, 8)).any()
    images = images64(80, 96, b=1)  # 5x6 patches
    got = _predictor(ckpt12)(images)
    torch.testing.assert_close(got, ref_scclip(ref_sd, images, text, traps=("no_repair",)), atol=TOL, rtol=0)


def test_repair_uses_only_in_grid_non_outlier_neighbours():
    from ovseg_clip.scclip import repair

    g = torch.Generator().manual_seed(1)
    t = torch.randn(1, 12, 3, generator=g)  # 3x4 grid
    outl = torch.zeros(1, 12, dtype=torch.bool)
    outl[0, [0, 1, 6]] = True
    got = repair(t, outl, (3, 4))
    torch.testing.assert_close(got[0], ref_repair(t[0], outl[0], (3, 4)))
    torch.testing.assert_close(got[0, 0], t[0, [4, 5]].mean(0))  # corner: neighbours 1 (outlier), 4, 5
    lone = torch.ones(1, 4, dtype=torch.bool)  # every neighbour an outlier: unchanged
    torch.testing.assert_close(repair(t[:, :4], lone, (2, 2)), t[:, :4])


def test_layer_indices_are_checked_against_the_depth(ckpt12):
    with pytest.raises(ConfigError, match="pre_adjust_idx must be a block index between 0 and 10 for this 12-layer"):
        build_predictor("scclip", pretrained=ckpt12, templates="single", pre_adjust_idx=11)
    with pytest.raises(ConfigError, match="multi_end_idx must be a block index between 0 and 11"):
        build_predictor("scclip", pretrained=ckpt12, templates="single", multi_end_idx=12)
    with pytest.raises(ConfigError, match="multi_end_idx .5. must be greater than multi_start_idx .5."):
        build_predictor("scclip", pretrained=ckpt12, templates="single", multi_start_idx=5, multi_end_idx=5)
    with pytest.raises(ConfigError, match="post_adjust_idx must be an integer"):
        build_predictor("scclip", pretrained=ckpt12, templates="single", post_adjust_idx=2.5)
    pred = build_predictor("scclip", pretrained=ckpt12, templates="single")
    with pytest.raises(ConfigError, match="post_adjust_idx"):
        pred.configure(post_adjust_idx=-1)
    assert pred.post_adjust_idx == 3  # rolled back
    with pytest.raises(ConfigError, match="has 2 layers: set them"):  # no authors' defaults for 2 blocks
        build_predictor("scclip", model="ovseg-tiny-vit", pretrained="random", templates="single")
    pred = build_predictor("scclip", model="ovseg-tiny-vit", pretrained="random", templates="single",
                           pre_adjust_idx=0, post_adjust_idx=0, multi_start_idx=0, multi_end_idx=1, res_cls=0.3)
    assert pred.multi_end_idx == 1


def test_vit_l_defaults_are_the_initial_commits():
    from ovseg_clip.scclip import AUTHOR_DEFAULTS

    assert AUTHOR_DEFAULTS[24] == dict(pre_adjust_idx=16, post_adjust_idx=6, multi_start_idx=8, multi_end_idx=19, res_cls=0.1)


def test_bfloat16_runs_and_stays_close():
    pred = build_predictor("scclip", model="ovseg-tiny-vit-12", pretrained="random", templates="single")
    ref, out = bfloat16_scores(pred, NAMES, _images(224, 224, b=2))
    assert torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1] > 0.99


def test_blocks_run_the_unfused_attention_of_the_authors_sequence_first_clip():
    """SC-CLIP's blocks equal, bit for bit, the same block run sequence-first (the authors' OpenAI `clip` layout,
    which never takes PyTorch's fused inference path), and the fast-path setting is restored afterwards."""
    from open_clip.transformer import ResidualAttentionBlock

    from ovseg_clip.dense import _run_block

    torch.manual_seed(0)
    blk = ResidualAttentionBlock(64, 4, batch_first=True).eval()
    seq_first = ResidualAttentionBlock(64, 4, batch_first=False).eval()
    seq_first.load_state_dict(blk.state_dict())
    x = torch.randn(2, 50, 64) * 3

    class Tower(torch.nn.Module):
        batch_first = True

    before = torch.backends.mha.get_fastpath_enabled()
    with torch.inference_mode():
        ours = _run_block(Tower(), blk, x, reference_path=True)
        authors = seq_first(x.transpose(0, 1)).transpose(0, 1)
    assert torch.equal(ours, authors)
    assert torch.backends.mha.get_fastpath_enabled() == before
