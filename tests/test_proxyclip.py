"""ProxyCLIP against an independent computation from its formulas, each parity trap flipped to show it matters.

The formula (mc-lan/ProxyCLIP e7b767f): mmseg's rounded CLIP statistics, centred zero padding to a multiple of 56,
the VFM fed the padded input un-normalised with the exact CLIP statistics and ImageNet-normalised, S = f̂ᵀf̂ of its
normed last-layer features on the (H/8, W/8) grid, S' = γ (S − β·mean S) per window, S' < 0 masked, softmax, applied
to CLIP's last-block values (⌊H/16⌋ × ⌊W/16⌋ grid, DINO-style positional embeddings) resized bilinearly to the VFM
grid, out_proj, ln_post, proj, cosine; a padded window's map upsampled to the padded size and cropped.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from ovseg import build_predictor
from ovseg.errors import ConfigError

from .vfm_formulas import (
    CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, TINY_VFM, clip_head, clip_trunk, dino_forward, images, mmseg_input,
)

TOL = 1e-5
NAMES = ["sky", "grass, lawn", "road", "water"]  # 5 names


@pytest.fixture(scope="module")
def pred():
    p = build_predictor("proxyclip", model="ovseg-tiny-vit", pretrained="random", templates="single",
                        vfm=dict(TINY_VFM, feature="x"))
    p.set_classes(NAMES)
    return p


def reference(pred, windows, beta, gamma, *, mean="window", pad="center", constants="mmseg", layout="hw",
              clip_pad16=False, v_mode="bilinear", pos="dino", feature="x", vfm_sees="imagenet", keep_diagonal=True):
    """ProxyCLIP's window scores at pixel resolution; keyword arguments flip one parity trap each."""
    b, _, h, w = windows.shape
    x = mmseg_input(windows, constants)
    dh, dw = -h % 56, -w % 56
    pads = (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2) if pad == "center" else (0, dw, 0, dh)
    x = F.pad(x, pads)
    hp, wp = x.shape[-2:]
    vit = pred.vfm.vit
    z = ((x * CLIP_STD + CLIP_MEAN) - IMAGENET_MEAN) / IMAGENET_STD if vfm_sees == "imagenet" else x
    out, qkv = dino_forward(vit, z)
    c = out.shape[-1]
    f = out[:, 1:] if feature == "x" else qkv[:, 1:, c : 2 * c]  # (B, N, C)
    grid = (hp // 8, wp // 8)
    f = F.normalize(f, dim=-1)
    sim = f @ f.transpose(1, 2)
    if mean == "window":
        mu = sim.mean(dim=(1, 2), keepdim=True)
    elif mean == "batch":
        mu = sim.mean()
    else:  # rows
        mu = sim.mean(dim=2, keepdim=True)
    logits = (sim - beta * mu) * gamma
    masked = logits < 0
    if keep_diagonal:
        empty = masked.all(-1, keepdim=True)
        masked = masked & ~(torch.eye(logits.shape[-1], dtype=torch.bool) & empty)
    attn = logits.masked_fill(masked, float("-inf")).softmax(-1)
    visual = pred.clip.visual
    xc = F.pad(x, (0, -wp % 16, 0, -hp % 16)) if clip_pad16 else x
    tokens, cgrid = clip_trunk(visual, xc, pos)
    block = visual.transformer.resblocks[-1]
    d = tokens.shape[-1]
    v = F.linear(block.ln_1(tokens), block.attn.in_proj_weight[2 * d :], block.attn.in_proj_bias[2 * d :])[:, 1:]
    if layout == "hw":
        v = v.reshape(b, cgrid[0], cgrid[1], d).permute(0, 3, 1, 2)
    else:  # the authors' (W/16, H/16) layout
        v = v.reshape(b, cgrid[1], cgrid[0], d).permute(0, 3, 1, 2)
    v = F.interpolate(v, size=grid, mode=v_mode, align_corners=False).flatten(2).transpose(1, 2)
    y = clip_head(visual, block.attn.out_proj(attn @ v))
    scores = torch.einsum("bne,qe->bqn", y, pred.text_embeddings).reshape(b, -1, *grid)
    scores = F.interpolate(scores, size=(hp, wp), mode="bilinear", align_corners=False)
    return scores[..., pads[2] : pads[2] + h, pads[0] : pads[0] + w]


def window_scores(pred, windows):
    out = pred(windows)
    if tuple(out.shape[-2:]) != tuple(windows.shape[-2:]):
        out = F.interpolate(out, size=windows.shape[-2:], mode="bilinear", align_corners=False)
    return out


def safe_beta(pred, windows):
    """A β whose threshold β·mean(S) is at least 2e-5 away from every similarity (the hard mask is discontinuous:
    float noise must not flip an entry), searched near the authors' 1.2."""
    b, _, h, w = windows.shape
    x = F.pad(mmseg_input(windows), ((-w % 56) // 2, -w % 56 - (-w % 56) // 2, (-h % 56) // 2, -h % 56 - (-h % 56) // 2))
    out, _ = dino_forward(pred.vfm.vit, ((x * CLIP_STD + CLIP_MEAN) - IMAGENET_MEAN) / IMAGENET_STD)
    f = F.normalize(out[:, 1:], dim=-1)
    sim = f @ f.transpose(1, 2)
    mu = sim.mean(dim=(1, 2), keepdim=True)
    best, margin = None, 0.0
    for beta in torch.linspace(1.1, 1.3, 81).tolist():
        m = float((sim - beta * mu).abs().min())
        if m > margin:
            best, margin = beta, m
    assert margin > 2e-5, margin
    return best


CASES = {"square_112": (2, 112, 112, 0), "padded_100x130": (1, 100, 130, 1)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_window_scores_match_the_formula(pred, case):
    b, h, w, seed = CASES[case]
    windows = images(b, h, w, seed)
    beta = safe_beta(pred, windows)
    pred.configure(beta=beta, gamma=3.0)
    try:
        out = pred(windows)
        expected = reference(pred, windows, beta, 3.0)
        # on the VFM grid when no padding was needed, else at pixel resolution (upsampled on the padded window)
        assert tuple(out.shape[-2:]) == ((h // 8, w // 8) if (h % 56, w % 56) == (0, 0) else (h, w))
        torch.testing.assert_close(window_scores(pred, windows), expected, atol=TOL, rtol=0)
    finally:
        pred.configure(beta=1.2, gamma=3.0)


TRAPS = {
    "one mean over the batch of windows": ("square_112", dict(mean="batch")),
    "row means instead of the matrix mean": ("square_112", dict(mean="rows")),
    "values laid out (W/16, H/16) as the authors' square-only code": ("padded_100x130", dict(layout="wh")),
    "padding bottom/right instead of centred": ("padded_100x130", dict(pad="corner")),
    "CLIP input padded to a multiple of 16": ("padded_100x130", dict(clip_pad16=True)),
    "values resized bicubically": ("square_112", dict(v_mode="bicubic")),
    "positional embeddings resized to the size": ("padded_100x130", dict(pos="size")),
    "VFM keys instead of its normed output": ("square_112", dict(feature="k")),
    "VFM fed the CLIP-normalised tensor": ("square_112", dict(vfm_sees="clip")),
}


@pytest.mark.parametrize("trap", sorted(TRAPS))
def test_each_parity_trap_changes_the_scores(pred, trap):
    """The formula above with one trap flipped is far from the predictor: the comparison can tell them apart."""
    case, flip = TRAPS[trap]
    b, h, w, seed = CASES[case]
    windows = images(b, h, w, seed)
    beta = safe_beta(pred, windows)
    pred.configure(beta=beta)
    try:
        out = window_scores(pred, windows)
    finally:
        pred.configure(beta=1.2)
    assert float((reference(pred, windows, beta, 3.0, **flip) - out).abs().max()) > 100 * TOL


def test_gamma_and_beta_enter_the_scores(pred):
    windows = images(1, 112, 112, 0)
    beta = safe_beta(pred, windows)
    pred.configure(beta=beta, gamma=3.0)
    try:
        out = window_scores(pred, windows)
        assert float((reference(pred, windows, beta, 3.3) - out).abs().max()) > 100 * TOL
        assert float((reference(pred, windows, beta, 1.0) - out).abs().max()) > 100 * TOL
    finally:
        pred.configure(beta=1.2)


def test_clip_input_uses_mmseg_rounded_constants(pred):
    """What CLIP's patch convolution receives: (255 x − mean) / std with the rounded constants, bit for bit."""
    seen = {}

    def record(module, inputs, output):
        seen["x"] = inputs[0].clone()

    handle = pred.clip.visual.conv1.register_forward_hook(record)
    try:
        windows = images(1, 112, 112, 3)
        pred(windows)
    finally:
        handle.remove()
    assert torch.equal(seen["x"], mmseg_input(windows))
    assert float((seen["x"] - mmseg_input(windows, "exact")).abs().max()) > 1e-6


def test_windows_of_a_batch_are_independent(pred):
    windows = images(3, 112, 112, 4)
    batched = pred(windows)
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], pred(windows[i : i + 1]), atol=1e-6, rtol=0)


def test_a_window_with_every_similarity_masked_keeps_the_diagonal_and_warns():
    """β·mean(S) above every similarity: the authors' code returns NaN; here each patch attends to itself."""
    p = build_predictor("proxyclip", model="ovseg-tiny-vit", pretrained="random", templates="single",
                        vfm=dict(TINY_VFM, feature="x"), beta=50.0)
    p.set_classes(NAMES)
    windows = images(1, 112, 112, 5)
    with pytest.warns(RuntimeWarning, match="keeps its similarity to itself"):
        out = p(windows)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(window_scores(p, windows), reference(p, windows, 50.0, 3.0), atol=TOL, rtol=0)
    assert torch.isnan(reference(p, windows, 50.0, 3.0, keep_diagonal=False)).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p(windows)  # said once per predictor


def test_output_grid_is_the_vfm_grid_and_patch_size_the_vfm_patch(pred):
    assert pred.patch_size == 8
    assert pred(images(1, 224, 168, 6)).shape == (1, 5, 28, 21)
    assert pred(images(1, 60, 60, 6)).shape == (1, 5, 60, 60)  # padded to 112: pixel resolution


@pytest.mark.parametrize("bad, option", [
    (dict(beta=-0.1), "beta"), (dict(gamma=0.0), "gamma"), (dict(gamma=True), "gamma"), (dict(pad_multiple=0), "pad_multiple"),
    (dict(grid="ceil"), "grid"),
])
def test_bad_options_are_refused_naming_the_option(pred, bad, option):
    with pytest.raises(ConfigError, match=option):
        pred.configure(**bad)
    assert (pred.beta, pred.gamma, pred.pad_multiple, pred.grid) == (1.2, 3.0, 56, "center")


def test_unregistered_vfm_and_a_patch_size_that_does_not_divide_the_window():
    with pytest.raises(ConfigError, match=r"vfm\.name 'dinov3'.*registered: .*dino"):
        build_predictor("proxyclip", model="ovseg-tiny-vit", pretrained="random", vfm=dict(TINY_VFM, name="dinov3"))
    p = build_predictor("proxyclip", model="ovseg-tiny-vit", pretrained="random", templates="single",
                        vfm=dict(TINY_VFM, model="vit_base_patch16_224", feature="x"))
    p.set_classes(NAMES)
    assert p(images(1, 112, 224, 7)).shape == (1, 5, 7, 14)  # 112 and 224 are multiples of 16
    with pytest.raises(ConfigError, match=r"patch size 16 .*vfm\.model.*does not divide the 168x168 window"):
        p(images(1, 150, 150, 7))
