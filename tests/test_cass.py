"""CASS against independent computations from its formulas, each parity trap flipped to show it matters.

The formula (MICV-yonsei/CASS 228ecdd): per window, the VFM sees the CLIP-normalised crop "un-normalised" with
ImageNet statistics and std 0.255 for blue, truncated to uint8, resized by Pillow to its short side, ImageNet-
normalised; its raw last-block keys, in float16, resized to CLIP's floor grid and mapped onto the range of CLIP's
keys; per head, a spectral matching (20 eigenvalues, Wasserstein-like distance, assignment on 1 − W with ties to
the identity), a rank-10 randomized SVD (seeded per call) of the paired VFM graph, eigen-scaling, zeroed diagonal,
min-max onto CLIP's graph, mix `(10 w D + A_c) / (10 w + 1)`, Gaussian bias, softmax, values, out_proj, ln_post,
proj; an object-presence prompt per name cluster and the whole-image term `(F̂·T'ᵀ)(1 − γ) + p γ`.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ovseg import build_predictor
from ovseg.errors import ConfigError
from ovseg_vfm import spectral
from ovseg_vfm.prompts import adjusted_text, cluster_names

from .vfm_formulas import (
    IMAGENET_MEAN, IMAGENET_STD, TINY_VFM, clip_head, clip_trunk, dino_forward, images, lsa, mmseg_input,
    standard_attention_path,
)

TOL = 1e-5
NAMES = ["sky, cloud", "grass", "lawn", "road, street", "water", "tree"]


@pytest.fixture(scope="module")
def pred():
    p = build_predictor("cass", model="ovseg-tiny-vit", pretrained="random", templates="single",
                        vfm=dict(TINY_VFM, feature="k"), dataset="context60", global_semantics_weight=0.25,
                        mean_vector_weight=0.3, h_threshold=0.9)
    p.set_classes(NAMES)
    return p


# ---- the formula ---------------------------------------------------------------------------------


def vfm_input(x, patch, sees="quirk", windows=None):
    """The VFM input: the authors' inverse normalisation (std 0.255 for blue), uint8 truncation, Pillow resize to
    the short side, ImageNet normalisation, top-left crop to the patch; or ("image") the true window."""
    side = min(x.shape[-2:])
    keep = side - side % patch
    if sees == "image":
        return ((windows - IMAGENET_MEAN) / IMAGENET_STD)[..., :keep, :keep]
    m = torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.255]).view(1, 3, 1, 1)
    s = torch.tensor([1 / 0.229, 1 / 0.224, 1 / 0.255]).view(1, 3, 1, 1)
    arrays = (((x - m) / s).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    out = []
    for a in arrays:
        square = np.asarray(Image.fromarray(a).resize((side, side)))
        t = torch.from_numpy(square.copy()).permute(2, 0, 1).contiguous().float().div(255)
        out.append(((t - IMAGENET_MEAN[0]) / IMAGENET_STD[0])[:, :keep, :keep])
    return torch.stack(out)


def spectrum(graphs):
    vals = torch.linalg.eigvalsh(graphs.double()).flip(-1)[:, :20]
    return F.normalize(F.normalize(vals, p=2, dim=1), p=1, dim=1)


def distance(vfm_graphs, clip_graphs):
    d, c = spectrum(vfm_graphs), spectrum(clip_graphs)
    heads = d.shape[0]
    w = torch.zeros(heads, heads, dtype=torch.float64)
    for i, j in itertools.product(range(heads), repeat=2):
        w[i, j] = (d[i].sort().values - c[j].sort().values).abs().sum()
    return w


def mix_head(vfm_graph, clip_graph, weight, *, seed, eigen):
    """One output head: rank-10 randomized SVD (torch.svd_lowrank, generator reseeded), stretch, zero diagonal,
    min-max onto the CLIP graph, `(10 w D + A_c) / (10 w + 1)`."""
    torch.manual_seed(seed)
    u, s, v = torch.svd_lowrank(vfm_graph.double(), q=min(10, vfm_graph.shape[-1]))
    if eigen:
        s = (s - s.min()) / (s.max() - s.min()) * (1.5 * s.max() - 0.5 * s.min()) + 0.5 * s.min()
    d = u @ torch.diag(s) @ v.T
    d.fill_diagonal_(0)
    d = (d - d.min()) / (d.max() - d.min()) * (clip_graph.max() - clip_graph.min()) + clip_graph.min()
    w = weight * 10.0
    return (w * d + clip_graph) / (w + 1)


def gaussian(grid, std):
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).double()
    return torch.exp(-torch.cdist(pos, pos) ** 2 / (2 * std**2)).float()


def cass_reference(pred, windows, image, *, dataset="context60", gsw=0.25, mvw=0.3, h=0.9, seed=42, fp16=True,
                   sees="quirk", key_norm=False, eigen=None, bias=True, global_from="image", clip_pad16=False,
                   constants="mmseg", matching="assign"):
    """CASS's window scores (B, Q, h, w); keyword arguments flip one parity trap each."""
    b, _, height, width = windows.shape
    eigen = dataset not in ("voc20", "city_scapes") if eigen is None else eigen
    visual = pred.clip.visual
    block = visual.transformer.resblocks[-1]
    x = mmseg_input(windows, constants)
    xc = F.pad(x, (0, -width % 16, 0, -height % 16)) if clip_pad16 else x
    tokens, grid = clip_trunk(visual, xc)
    n = grid[0] * grid[1]
    with standard_attention_path():
        if global_from == "image":
            g = clip_head(visual, block(clip_trunk(visual, mmseg_input(image[None], constants))[0])[:, :1])[:, 0]
            g = g.expand(b, -1)
        else:
            g = clip_head(visual, block(tokens)[:, :1])[:, 0]
    d = tokens.shape[-1]
    heads = block.attn.num_heads
    hd = d // heads
    scale = hd**-0.5
    qkv = F.linear(block.ln_1(tokens), block.attn.in_proj_weight, block.attn.in_proj_bias)[:, 1:]
    k = qkv[..., d : 2 * d].reshape(b, n, heads, hd).transpose(1, 2)
    v = qkv[..., 2 * d :].reshape(b, n, heads, hd).transpose(1, 2)
    z = vfm_input(x, 8, sees, windows)
    _, dqkv = dino_forward(pred.vfm.vit, z)
    keys = dqkv[:, 1:, d : 2 * d]
    keys = F.normalize(keys, dim=-1) if key_norm else keys
    keys = keys.half() if fp16 else keys
    side = z.shape[-1] // 8
    keys = F.interpolate(keys.transpose(1, 2).reshape(b * heads, hd, side, side), size=grid, mode="bilinear",
                         align_corners=False).reshape(b, heads, hd, n).transpose(2, 3)
    outs = []
    for i in range(b):
        kb, dk = k[i], keys[i]
        dk = (dk - dk.min()) / (dk.max() - dk.min()) * (kb.max() - kb.min()) + kb.min()
        clip_graphs = kb @ kb.transpose(1, 2) * scale
        vfm_graphs = dk @ dk.transpose(1, 2) * scale
        cost = (1 - distance(vfm_graphs, clip_graphs)).float()
        col = lsa(cost.double().numpy() + 1e-6 * (1 - np.eye(heads))) if matching == "assign" else np.arange(heads)
        logits = torch.stack([mix_head(vfm_graphs[col[j]], clip_graphs[j], 1 - cost[j, col[j]], seed=seed, eigen=eigen)
                              for j in range(heads)]).float()
        if bias:
            logits = logits + gaussian(grid, 5.0)
        o = logits.softmax(-1) @ v[i]
        outs.append(block.attn.out_proj(o.transpose(0, 1).reshape(n, d)))
    feats = clip_head(visual, torch.stack(outs))  # (B, N, E)
    text = pred.text_embeddings
    p = F.normalize(g, dim=-1) @ text.T  # (B, Q)
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    clusters = fcluster(linkage(pdist(text.numpy().astype(np.float64), "cosine"), "ward"), t=h, criterion="distance") - 1
    scores = []
    for i in range(b):
        adjusted = text.clone()
        for c in range(clusters.max() + 1):
            members = np.where(clusters == c)[0]
            best = int(members[int(np.argmax(p[i, members].numpy()))])
            t = F.normalize(text[best], dim=0)
            top = (F.normalize(feats[i], dim=-1) @ t).topk(2).indices
            mu = F.normalize(feats[i, top].mean(0), dim=0)
            adjusted[best] = F.normalize((1 - mvw) * t + mvw * mu, dim=0)
        scores.append((feats[i] @ adjusted.T) * (1 - gsw) + p[i] * gsw)
    return torch.stack(scores).transpose(1, 2).reshape(b, -1, *grid)


# ---- the whole predictor ------------------------------------------------------------------------------

CASES = {
    # two square windows, global vector from a larger image, Context60's stretch
    "square_64": dict(windows=(2, 64, 64, 1), image=(96, 128, 1), dataset="context60"),
    # a non-square window (Pillow squash to 70x70, floor grid 4x6), VOC20 (no stretch)
    "nonsquare_70x100": dict(windows=(1, 70, 100, 2), image=(80, 120, 3), dataset="voc20"),
}


def run(pred, case, **options):
    spec = CASES[case]
    windows, image = images(*spec["windows"]), images(1, *spec["image"])[0]
    pred.configure(dataset=spec["dataset"], **options)
    try:
        pred.set_image(image)
        return pred(windows), windows, image
    finally:
        pred.configure(dataset="context60", global_semantics_weight=0.25, mean_vector_weight=0.3, h_threshold=0.9,
                       svd_seed=42)
        pred.set_image(None)


@pytest.mark.parametrize("case", sorted(CASES))
def test_window_scores_match_the_formula(pred, case):
    out, windows, image = run(pred, case)
    grid = (windows.shape[-2] // 16, windows.shape[-1] // 16)
    assert out.shape == (windows.shape[0], 8, *grid)
    torch.testing.assert_close(out, cass_reference(pred, windows, image, dataset=CASES[case]["dataset"]), atol=TOL, rtol=0)


TRAPS = {
    "another SVD seed": ("square_64", dict(seed=0)),
    "no head matching (identity)": ("square_64", dict(matching="identity")),
    "VFM graph in float32": ("square_64", dict(fp16=False)),
    "VFM fed the true image": ("square_64", dict(sees="image")),
    "L2-normalised VFM keys": ("square_64", dict(key_norm=True)),
    "eigen-scaling switched": ("square_64", dict(eigen=False)),
    "no Gaussian bias": ("square_64", dict(bias=False)),
    "global vector from the window": ("square_64", dict(global_from="window")),
    "CLIP input padded to 16": ("nonsquare_70x100", dict(clip_pad16=True)),
    "[0, 1] normalisation constants": ("square_64", dict(constants="exact")),
    "another h_threshold": ("square_64", dict(h=0.05)),
}


@pytest.mark.parametrize("trap", sorted(TRAPS))
def test_each_parity_trap_changes_the_scores(pred, trap):
    case, flip = TRAPS[trap]
    out, windows, image = run(pred, case)
    flip = dict(flip, dataset=CASES[case]["dataset"])
    if "clip_pad16" in flip:  # another grid: compare at the window's resolution
        size = windows.shape[-2:]
        ref = F.interpolate(cass_reference(pred, windows, image, **flip), size=size, mode="bilinear", align_corners=False)
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
    else:
        ref = cass_reference(pred, windows, image, **flip)
    assert float((ref - out).abs().max()) > 10 * TOL


def test_head_matching_is_not_the_identity_in_the_trap_case(pred):
    """Precondition of the 'no head matching' trap: some window of that case pairs heads across."""
    seen = []
    original = spectral.match_heads

    def record(distance):
        col, weight = original(distance)
        seen.append(col)
        return col, weight

    spectral.match_heads = record
    try:
        run(pred, "square_64")
    finally:
        spectral.match_heads = original
    assert any((col != torch.arange(col.shape[-1])).any() for c in seen for col in c)


def test_windows_are_independent_of_batch_and_call_order(pred):
    """Each window's SVD draws from its own seeded generator: alone, after another window, in a batch, or after the
    global RNG moved, a window gets the same scores."""
    windows = images(3, 64, 64, 4)
    alone = pred(windows[2:3])
    torch.randn(1000)
    pred(windows[:1])
    again = pred(windows[2:3])
    batched = pred(windows)
    torch.testing.assert_close(again, alone, atol=0, rtol=0)
    torch.testing.assert_close(batched[2:3], alone, atol=1e-6, rtol=0)


def test_global_vector_comes_from_the_image_unless_city_scapes_or_unset(pred):
    windows, image = images(1, 64, 64, 5), images(1, 96, 96, 6)[0]
    pred.set_image(image)
    from_image = pred(windows)
    pred.configure(dataset="city_scapes")
    own = pred(windows)
    pred.configure(dataset="context60")
    pred.set_image(None)
    unset = pred(windows)
    torch.testing.assert_close(unset, cass_reference(pred, windows, image, global_from="window"), atol=TOL, rtol=0)
    torch.testing.assert_close(own, cass_reference(pred, windows, image, global_from="window", dataset="city_scapes"),
                               atol=TOL, rtol=0)
    assert float((from_image - unset).abs().max()) > 10 * TOL


# ---- the pieces ---------------------------------------------------------------------------------------


def test_lowrank_svd_is_torchs_algorithm_with_a_reseeded_generator():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 30, 30, generator=g, dtype=torch.float64)
    a = a @ a.mT
    u, s, v = spectral.lowrank_svd(a, 10, seed=42)
    torch.randn(7)  # the global stream does not matter
    for i in range(3):
        torch.manual_seed(42)
        ur, sr, vr = torch.svd_lowrank(a[i], q=10)
        torch.testing.assert_close(u[i] @ torch.diag(s[i]) @ v[i].T, ur @ torch.diag(sr) @ vr.T, atol=1e-10, rtol=0)
    wide = torch.randn(12, 20, generator=g, dtype=torch.float64)
    uw, sw, vw = spectral.lowrank_svd(wide, 5, seed=1)
    torch.manual_seed(1)
    ur, sr, vr = torch.svd_lowrank(wide, q=5)
    torch.testing.assert_close(uw @ torch.diag(sw) @ vw.T, ur @ torch.diag(sr) @ vr.T, atol=1e-10, rtol=0)
    u0, s0, v0 = spectral.lowrank_svd(a, 10, seed=0)
    assert float((u0[0] @ torch.diag(s0[0]) @ v0[0].T - u[0] @ torch.diag(s[0]) @ v[0].T).abs().max()) > 1e-6


def test_spectral_distance_and_matching_follow_the_formula():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(2, 3, 12, 4, generator=g)
    graphs = k @ k.mT
    other = torch.randn(2, 3, 12, 4, generator=g)
    other = other @ other.mT
    w = spectral.spectral_distance(graphs, other)
    for b in range(2):
        torch.testing.assert_close(w[b], distance(graphs[b], other[b]), atol=1e-12, rtol=0)
    col, weight = spectral.match_heads(w)
    for b in range(2):
        cost = (1 - w[b]).float()
        best = min(itertools.permutations(range(3)), key=lambda p: sum(float(cost[i, p[i]]) for i in range(3)))
        assert tuple(col[b].tolist()) == best
        torch.testing.assert_close(weight[b], 1 - cost[torch.arange(3), col[b]])


def test_tied_matchings_resolve_to_the_identity():
    """A separable W (every pairing costs the same) must pair each head with itself, whatever the rounding."""
    a, c = torch.tensor([0.3, 0.1, 0.7]), torch.tensor([0.2, 0.5, 0.05])
    w = (a[:, None] + c[None, :]).double()[None]  # W[i, j] = a_i + c_j: every permutation sums the same
    col, weight = spectral.match_heads(w)
    assert col.tolist() == [[0, 1, 2]]
    torch.testing.assert_close(weight[0], w[0].diagonal().float(), atol=1e-6, rtol=0)


def test_output_head_mixes_the_vfm_head_its_column_names():
    """With a 3-cycle assignment, output head h uses VFM head col[h] and weight W[h, col[h]] (the authors'
    indexing), not the VFM head whose column is h."""
    g = torch.Generator().manual_seed(2)
    kv, kc = torch.randn(1, 3, 16, 4, generator=g), torch.randn(1, 3, 16, 4, generator=g)
    vfm_graphs, clip_graphs = (kv @ kv.mT).half(), kc @ kc.mT
    col = torch.tensor([[1, 2, 0]])
    weight = torch.tensor([[0.3, 0.2, 0.1]])
    original = spectral.match_heads
    spectral.match_heads = lambda distance: (col, weight)
    try:
        out = spectral.distilled_graph(vfm_graphs, clip_graphs, eigen_scaling=True, seed=42)
    finally:
        spectral.match_heads = original
    for h in range(3):
        expected = mix_head(vfm_graphs[0, col[0, h]], clip_graphs[0, h], weight[0, h], seed=42, eigen=True).float()
        torch.testing.assert_close(out[0, h], expected, atol=1e-5, rtol=0)
    inverse = [int((col[0] == h).nonzero()) for h in range(3)]
    natural = mix_head(vfm_graphs[0, inverse[0]], clip_graphs[0, 0], weight[0, 0], seed=42, eigen=True).float()
    assert float((out[0, 0] - natural).abs().max()) > 1e-3


def test_key_range_mapping_stays_in_float16_per_window():
    g = torch.Generator().manual_seed(3)
    vfm = (torch.randn(2, 2, 9, 4, generator=g) * 5).half()
    clip = torch.randn(2, 2, 9, 4, generator=g) * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    out = spectral.match_key_range(vfm, clip)
    assert out.dtype == torch.float16
    for b in range(2):
        d, k = vfm[b], clip[b]
        assert torch.equal(out[b], (d - d.min()) / (d.max() - d.min()) * (k.max() - k.min()) + k.min())
        assert float(out[b].float().min()) == pytest.approx(float(k.min()), abs=1e-2)


def test_name_clusters_are_ward_linkage_on_cosine_distances():
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    g = torch.Generator().manual_seed(4)
    base = torch.randn(3, 16, generator=g)
    text = F.normalize(torch.cat([base + 0.2 * torch.randn(3, 16, generator=g) for _ in range(3)]), dim=-1)
    for h in (0.0, 0.3, 1.0, 3.0):
        expected = fcluster(linkage(pdist(text.double().numpy(), "cosine"), "ward"), t=h, criterion="distance") - 1
        assert cluster_names(text, h).tolist() == expected.tolist()
    assert len(set(cluster_names(text, 0.0).tolist())) == 9 and len(set(cluster_names(text, 1.0).tolist())) < 9


def test_object_presence_prompt_adjusts_one_name_per_cluster():
    g = torch.Generator().manual_seed(5)
    feats = F.normalize(torch.randn(2, 10, 8, generator=g), dim=-1)
    text = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    presence = torch.randn(2, 5, generator=g)
    presence[1, 3] = presence[1, 4] = presence[1].max() + 1  # a tie: the first name wins
    clusters = torch.tensor([0, 1, 0, 2, 2])
    out = adjusted_text(feats, text, presence, clusters, 0.4)
    for b in range(2):
        expected = text.clone()
        for c in range(3):
            members = (clusters == c).nonzero()[:, 0]
            best = int(members[presence[b, members].argmax()])
            t = F.normalize(text[best], dim=0)
            top = (feats[b] @ t).topk(2).indices
            expected[best] = F.normalize(0.6 * t + 0.4 * F.normalize(feats[b, top].mean(0), dim=0), dim=0)
        torch.testing.assert_close(out[b], expected, atol=1e-6, rtol=0)
    assert torch.equal(out[1, 4], text[4])  # the tie went to name 3


# ---- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, option", [
    (dict(dataset="coco_stuff"), "dataset"), (dict(global_semantics_weight=1.5), "global_semantics_weight"),
    (dict(mean_vector_weight=-0.1), "mean_vector_weight"), (dict(h_threshold=-1), "h_threshold"),
    (dict(gaussian_std=0), "gaussian_std"), (dict(svd_seed=1.5), "svd_seed"), (dict(grid="pad"), "grid"),
])
def test_bad_options_are_refused_naming_the_option(pred, bad, option):
    with pytest.raises(ConfigError, match=option):
        pred.configure(**bad)
    assert (pred.dataset, pred.global_semantics_weight, pred.grid) == ("context60", 0.25, "floor")


def test_the_vfm_must_give_keys_of_clip_width():
    with pytest.raises(ConfigError, match=r"vfm\.feature must be 'k'"):
        build_predictor("cass", model="ovseg-tiny-vit", pretrained="random", vfm=dict(TINY_VFM, feature="x"))
    wide = dict(TINY_VFM, model_kwargs=dict(embed_dim=96, depth=1, num_heads=2))
    with pytest.raises(ConfigError, match=r"vfm\.model .* width 96 .* 64"):
        build_predictor("cass", model="ovseg-tiny-vit", pretrained="random", vfm=wide)
    with pytest.raises(ConfigError, match=r"vfm\.name 'sam'"):
        build_predictor("cass", model="ovseg-tiny-vit", pretrained="random", vfm=dict(TINY_VFM, name="sam"))


def test_small_windows_use_a_lower_rank_and_windows_below_a_patch_are_refused(pred):
    """Fewer than 10 patches: the SVD's rank is the patch count (the authors' optimal_q has no rank there)."""
    out = pred(images(1, 40, 40, 8))
    assert out.shape == (1, 8, 2, 2) and torch.isfinite(out).all()
    with pytest.raises(ConfigError, match="smaller than one 16-pixel patch"):
        pred(images(1, 12, 40, 8))


@pytest.mark.parametrize("name", ["cass", "proxyclip"])
def test_scores_are_float32_under_autocast_and_close_to_float32(name):
    """A bf16-mixed run: scores stay float32 and the thresholded/graph steps keep their dtypes."""
    vfm = dict(TINY_VFM, feature="k" if name == "cass" else "x")
    p = build_predictor(name, model="ovseg-tiny-vit", pretrained="random", templates="single", vfm=vfm)
    p.set_classes(NAMES)
    windows = images(2, 64, 64, 9)
    reference = p(windows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = p(windows)
    assert out.dtype == torch.float32
    assert float((out - reference).abs().max()) < 5e-2
