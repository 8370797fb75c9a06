"""PGSeg / GroupViT predictors: release checkpoint layout, safe loading, and the paper's decoding.

A tiny random PGSeg (same architecture, small widths) is saved the way the release saves it
(`{"model": state_dict, "optimizer": ..., "epoch": ..., "config": ...}` with the release's key names,
including its training-only modules) and loaded through `pretrained=PATH`. The decoding reference
below follows `GroupViTSegInference.encode_decode` of the release step by step with plain torch ops;
it shares no code with the plugin's `decode.py`.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from ovseg import build_predictor
from ovseg.evaluation.methods import dataset_protocol, load_method, stage_kwargs
from ovseg.errors import ConfigError, WeightsError
from ovseg.pipeline.protocol import Protocol
from ovseg.pipeline.refiners import NoRefiner
from ovseg.pipeline.segmenter import Segmenter
from ovseg.pipeline.stages import IMAGENET_MEAN, IMAGENET_STD, prepare_images
from ovseg_pgseg.decode import background_groups, paper_group_scores, topk_class_mask
from ovseg_pgseg.grouping import PrototypeReconstruction

TINY = dict(
    img_size=32,
    embed_dim=32,
    depths=(1, 1, 1),
    num_heads=2,
    num_group_tokens=(8, 4, 0),
    num_output_groups=(8, 4),
    text_width=16,
    text_layers=1,
    output_dim=16,
    proj_hidden_dim=24,
)
FG = ["cat", "dog", "car", "tree", "road", "sky"]  # 6 classes: the top-5 mask drops one per window
VOCAB = ["background"] + FG

# this port's module names -> the release's (models/group_vit.py, models/pgseg.py,
# models/multi_label_contrastive.py, models/transformer.py), written independently of the plugin
TO_RELEASE = [
    (r"^visual\.stages\.(\d+)\.prototypes\.", r"img_encoder.layers.\1.downsample_spatial."),
    (r"^visual\.stages\.(\d+)\.grouping\.", r"img_encoder.layers.\1.downsample."),
    (r"^visual\.stages\.", "img_encoder.layers."),
    (r"^visual\.", "img_encoder."),
    (r"^text\.blocks\.(\d+)\.attn\.in_proj\.(weight|bias)$", r"text_encoder.transformer.resblocks.\1.attn.in_proj_\2"),
    (r"^text\.blocks\.", "text_encoder.transformer.resblocks."),
    (r"^text\.", "text_encoder."),
    (r"^visual_proj\.", "img_projector."),
    (r"^text_proj\.", "text_projector."),
]
# keys the release state dict has (read off the release's module tree)
RELEASE_KEYS = [
    "logit_scale",
    "img_encoder.pos_embed",
    "img_encoder.patch_embed.proj.weight",
    "img_encoder.patch_embed.norm.bias",
    "img_encoder.layers.0.group_token",
    "img_encoder.layers.0.blocks.0.attn.qkv.weight",
    "img_encoder.layers.0.blocks.0.mlp.fc2.bias",
    "img_encoder.layers.0.downsample.norm_tokens.weight",
    "img_encoder.layers.0.downsample.mlp_inter.fc1.weight",
    "img_encoder.layers.0.downsample.pre_assign_attn.attn.q_proj.weight",
    "img_encoder.layers.0.downsample.pre_assign_attn.norm_post.weight",
    "img_encoder.layers.0.downsample.assign.k_proj.bias",
    "img_encoder.layers.0.downsample.mlp_channels.fc1.weight",
    "img_encoder.layers.0.downsample_spatial.mu",
    "img_encoder.layers.0.downsample_spatial.mapping_x.linear_hidden.1.running_var",
    "img_encoder.layers.1.group_projector.0.weight",
    "img_encoder.layers.1.group_projector.1.fc2.weight",
    "img_encoder.layers.2.blocks.0.norm1.weight",
    "img_encoder.norm.weight",
    "text_encoder.token_embedding.weight",
    "text_encoder.positional_embedding",
    "text_encoder.transformer.resblocks.0.attn.in_proj_weight",
    "text_encoder.transformer.resblocks.0.attn.out_proj.bias",
    "text_encoder.transformer.resblocks.0.mlp.c_fc.weight",
    "text_encoder.ln_final.bias",
    "img_projector.linear_hidden.0.weight",
    "img_projector.linear_hidden.1.running_mean",
    "text_projector.linear_out.bias",
]


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Non-degenerate random weights: perturbed parameters, positive random BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def to_release(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, repl in TO_RELEASE:
            if re.match(pattern, key):
                key = re.sub(pattern, repl, key, count=1)
                break
        out[key] = value.clone()
    return out


def release_checkpoint(predictor, with_training_heads: bool) -> dict:
    """A dict shaped like the release's `save_checkpoint` output (without the pickled config)."""
    g = torch.Generator().manual_seed(7)
    model = to_release(predictor.model.state_dict())
    if with_training_heads:  # PGSeg's training-only modules
        dim, out = TINY["embed_dim"], TINY["output_dim"]
        model["img_encoder.mapping_text.linear_hidden.0.weight"] = torch.randn(24, dim, 1, generator=g)
        model["img_encoder.mapping_text.linear_out.weight"] = torch.randn(out, 24, 1, generator=g)
        model["img_encoder.logit_scale"] = torch.tensor(2.3)
        model["text_encoder.Atten.mu"] = torch.randn(1, 8, 1, generator=g)
    return {
        "model": model,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]},
        "lr_scheduler": {"last_epoch": 29},
        "metrics": {"max_accuracy": 0.5},
        "epoch": 29,
    }


@pytest.fixture(scope="module")
def reference():
    """A tiny random PGSeg (kept in memory) and its checkpoint in the release layout."""
    torch.manual_seed(0)
    pred = build_predictor("pgseg", pretrained="random", **TINY)
    randomize_(pred.model, seed=1)
    with torch.no_grad():
        pred.model.logit_scale.fill_(math.log(50.0))  # sharper than the init, below the release's clamp
    return pred


@pytest.fixture(scope="module")
def release_file(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("pgseg") / "pgseg_release.pth"
    ckpt = release_checkpoint(reference, with_training_heads=True)
    for key in RELEASE_KEYS:
        assert key in ckpt["model"], key
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(3))


def test_release_checkpoint_loads_through_pretrained_path(reference, release_file, images):
    loaded = build_predictor("pgseg", pretrained=str(release_file), **TINY)
    assert loaded.random_weights is False and reference.random_weights is True
    assert loaded.patch_size == 16
    # the training-only modules were dropped; everything else is loaded exactly
    ours = loaded.model.state_dict()
    for key, value in reference.model.state_dict().items():
        assert torch.equal(ours[key], value), key
    for pred in (reference, loaded):
        pred.set_classes(VOCAB)
    out = loaded(images)
    assert out.shape == (2, len(VOCAB), 3, 4) and out.dtype == torch.float32
    assert torch.equal(out, reference(images))
    assert out.abs().max() <= 1.0 + 1e-5  # assignment-weighted cosines
    assert out.std() > 0


def test_shapes_with_padding_synonyms_and_determinism(reference):
    reference.set_classes([["background", "sky"], "cat, kitten", "dog"])
    x = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(5))
    first = reference(x)
    assert first.shape == (3, 5, 3, 4)  # ceil(40/16), ceil(56/16); Q = 5 names
    assert torch.equal(first, reference(x))
    reference.configure(decode="paper", output="pixel")
    try:
        pixel = reference(x)
        assert pixel.shape == (3, 5, 40, 56)
        assert torch.equal(pixel, reference(x))
    finally:
        reference.configure(decode="soft", output="patch")


def test_pickled_extras_are_refused_without_the_trust_flag(reference, tmp_path, images):
    from omegaconf import OmegaConf

    ckpt = release_checkpoint(reference, with_training_heads=True)
    ckpt["config"] = OmegaConf.create({"model": {"type": "MultiLabelContrastive"}})  # as the release pickles it
    path = tmp_path / "with_config.pth"
    torch.save(ckpt, path)
    with pytest.raises(WeightsError, match="trust_checkpoint=True"):
        build_predictor("pgseg", pretrained=str(path), **TINY)
    trusted = build_predictor("pgseg", pretrained=str(path), trust_checkpoint=True, **TINY)
    reference.set_classes(VOCAB)
    trusted.set_classes(VOCAB)
    assert torch.equal(trusted(images), reference(images))

    # the one-off conversion leaves a file that loads without trust
    from ovseg_pgseg.checkpoint import main as convert

    out = tmp_path / "weights.safetensors"
    convert([str(path), str(out), "--trust"])
    converted = build_predictor("pgseg", pretrained=str(out), **TINY)
    converted.set_classes(VOCAB)
    assert torch.equal(converted(images), reference(images))


def test_wrong_checkpoints_give_clear_errors(reference, release_file, tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        build_predictor("pgseg", pretrained=str(tmp_path / "missing.pth"), **TINY)
    with pytest.raises(WeightsError, match="use the pgseg predictor"):
        build_predictor("groupvit", pretrained=str(release_file), **TINY)
    torch.manual_seed(0)
    groupvit = build_predictor("groupvit", pretrained="random", **TINY)
    path = tmp_path / "groupvit.pth"
    ckpt = release_checkpoint(groupvit, with_training_heads=False)
    ckpt["model"]["multi_label_logit_scale"] = torch.tensor(2.6)  # GroupViT's YFCC release has it
    torch.save(ckpt, path)
    assert build_predictor("groupvit", pretrained=str(path), **TINY).random_weights is False
    with pytest.raises(WeightsError, match="use the groupvit predictor"):
        build_predictor("pgseg", pretrained=str(path), **TINY)
    with pytest.raises(WeightsError, match="shape mismatches"):
        build_predictor("pgseg", pretrained=str(release_file), **{**TINY, "output_dim": 8})
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth"):
        build_predictor("pgseg", pretrained=str(garbage), **TINY)


def test_option_errors():
    with pytest.raises(ConfigError, match="unknown option"):
        build_predictor("pgseg", pretrained="random", width=3, **TINY)
    with pytest.raises(ConfigError, match="needs decode='paper'"):
        build_predictor("pgseg", pretrained="random", bg_thresh=0.5, **TINY)
    with pytest.raises(ConfigError, match="decode must be"):
        build_predictor("pgseg", pretrained="random", decode="hard", **TINY)
    with pytest.raises(ConfigError, match="invalid architecture"):
        build_predictor("pgseg", pretrained="random", **{**TINY, "num_output_groups": (8,)})
    pred = build_predictor("pgseg", pretrained="random", decode="paper", bg_thresh=0.5, background_class=3, **TINY)
    pred.set_classes(["a", "b"])
    with pytest.raises(ConfigError, match="background_class 3"):
        pred(torch.rand(1, 3, 32, 32))


# ------------------------------------------------------------------------------------------
# the paper's decoding against the release's steps


def release_groups(assign, grid, size):
    """`get_attn_maps(rescale=True)` + one-hot: the pixel-to-group map (H, W, G) of one window."""
    h, w = grid
    G = assign.shape[-1]
    attn = assign.reshape(1, h, w, G).permute(0, 3, 1, 2)
    attn = F.interpolate(attn, size=tuple(size), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    return F.one_hot(attn.argmax(dim=-1), num_classes=G).to(attn.dtype)


def release_affinity(groups, image, text_fg, scale):
    """The group affinity (G, C) of `encode_decode`: top-5 masked softmax times plain softmax."""
    group_affinity = (groups @ text_fg.T) * scale
    pre_group_affinity = F.softmax(group_affinity, dim=-1)
    avg_affinity = F.softmax((image @ text_fg.T) * scale, dim=-1)
    mask = torch.zeros_like(avg_affinity)
    topk = avg_affinity.topk(dim=-1, k=min(5, text_fg.shape[0]))
    mask.scatter_add_(dim=-1, index=topk.indices, src=torch.ones_like(topk.values))
    group_affinity = group_affinity.masked_fill(~mask.bool(), float("-inf"))
    return F.softmax(group_affinity, dim=-1) * pre_group_affinity


def release_encode_decode(onehot, group_affinity, bg_thresh):
    """`GroupViTSegInference.encode_decode` for one window: (1 + C, H, W), class 0 = background."""
    fg = onehot @ group_affinity
    logits = torch.zeros(group_affinity.shape[1] + 1, *onehot.shape[:2])
    logits[1:] = fg.permute(2, 0, 1)
    thresh = min(bg_thresh, group_affinity.max().item())
    logits[0, fg.max(dim=-1).values < thresh] = 1
    return logits


def test_paper_decoding_matches_the_release(reference, images):
    reference.set_classes(VOCAB)
    x = prepare_images(images, IMAGENET_MEAN, IMAGENET_STD, 16)
    with torch.no_grad():
        enc = reference.model.encode_image(x)
    text_fg = reference.text_embeddings[1:]
    onehots = [release_groups(enc.assignment[b], enc.grid, images.shape[-2:]) for b in range(2)]
    affinities = [release_affinity(enc.groups[b], enc.image[b], text_fg, reference.logit_scale) for b in range(2)]
    # a threshold between the two weakest groups that own pixels of window 0: both sides of the rule occur
    used = onehots[0].flatten(0, 1).sum(0) > 0
    maxima = affinities[0].amax(-1)[used].sort().values
    assert len(maxima) >= 2
    bg_thresh = float(maxima[:2].mean())
    expected = torch.stack([release_encode_decode(onehots[b], affinities[b], bg_thresh) for b in range(2)])
    reference.configure(decode="paper", output="pixel", bg_thresh=bg_thresh)
    try:
        out = reference(images)
    finally:
        reference.configure(decode="soft", output="patch", bg_thresh=None)
    assert out.shape == expected.shape == (2, len(VOCAB), 48, 64)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # the rules were exercised: one class masked per window, background and foreground both present
    for b in range(2):
        assert sum(bool((expected[b, 1:][c] == 0).all()) for c in range(len(FG))) >= 1
    assert 0 < expected[0, 0].mean() < 1


def test_topk_mask_keeps_the_best_classes_with_all_their_names():
    name_to_class = torch.tensor([0, 0, 1, 2, 2, 3])
    logits = torch.tensor([[0.1, 0.9, 0.5, 0.2, 0.3, 0.8], [0.0, 0.0, 0.7, 0.1, 0.6, 0.2]])
    keep = topk_class_mask(logits, name_to_class, 2)
    # window 0: class scores (0.9, 0.5, 0.3, 0.8) -> classes 0 and 3; window 1: (0.0, 0.7, 0.6, 0.2) -> 1 and 2
    assert keep.tolist() == [[True, True, False, False, False, True], [False, False, True, True, True, False]]
    assert bool(topk_class_mask(logits, name_to_class, 5).all())  # k larger than the class count


def test_background_threshold_is_clamped_per_window():
    probs = torch.tensor(
        [
            [[0.9, 0.05], [0.5, 0.1], [0.2, 0.1]],  # window 0: group maxima 0.9, 0.5, 0.2
            [[0.3, 0.1], [0.1, 0.4], [0.1, 0.05]],  # window 1: all below 0.6, best 0.4
        ]
    )
    bg = background_groups(probs, 0.6)
    assert bg.tolist() == [[False, True, True], [True, False, True]]  # window 1 keeps its best group

    # in the full group scores the background column is that indicator, other columns the probabilities
    torch.manual_seed(0)
    groups = F.normalize(torch.randn(2, 3, 8), dim=-1)
    image = F.normalize(torch.randn(2, 8), dim=-1)
    text = F.normalize(torch.randn(4, 8), dim=-1)
    background = torch.tensor([True, False, False, False])
    scores = paper_group_scores(
        groups, image, text, logit_scale=10.0, topk=5, name_to_class=torch.arange(4), background=background, bg_thresh=0.6
    )
    fg_logits = 10.0 * groups @ text[1:].T
    fg_probs = F.softmax(fg_logits, -1) * F.softmax(fg_logits, -1)  # 3 classes <= 5: nothing masked
    torch.testing.assert_close(scores[..., 1:], fg_probs)
    thresh = fg_probs.amax(dim=(1, 2)).clamp(max=0.6)
    assert torch.equal(scores[..., 0], (fg_probs.amax(-1) < thresh[:, None]).float())


def test_npr_follows_the_release_formula():
    torch.manual_seed(0)
    npr = PrototypeReconstruction(dim=8, num_prototypes=3, hidden_dim=5, iters=10).eval()
    x = torch.randn(2, 7, 8)
    mu = npr.mu.repeat(2, 1, 1)
    for _ in range(10):
        z = F.softmax(torch.matmul(x, mu.permute(0, 2, 1)), dim=-1)
        z = z / (1e-6 + z.sum(dim=1, keepdim=True))
        mu = torch.matmul(z.permute(0, 2, 1), x)
        mu = mu / (1e-6 + mu.norm(dim=2, keepdim=True))
    recon = torch.matmul(z, mu)
    conv1, bn, conv2 = npr.mapping_x.linear_hidden[0], npr.mapping_x.linear_hidden[1], npr.mapping_x.linear_out
    expected = conv2(F.relu(bn(conv1(recon.transpose(1, 2))))).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(npr(x), expected)
    assert torch.equal(npr.mu, npr.mu.clone())  # the buffer is not updated


def test_bfloat16_and_segmenter_with_the_none_refiner(reference):
    reference.set_classes(VOCAB)
    reference.configure(decode="paper", output="pixel", bg_thresh=0.5)
    try:
        seg = Segmenter(reference, NoRefiner(), protocol=Protocol(short_side=48, crop=48, stride=32))
        result = seg.segment(torch.rand(3, 50, 80, generator=torch.Generator().manual_seed(9)), VOCAB)
        assert result.labels.shape == (50, 80) and int(result.labels.max()) < len(VOCAB)
        half = reference.to(torch.bfloat16)
        out = half(torch.rand(1, 3, 32, 48))
        assert out.dtype == torch.float32 and out.shape == (1, len(VOCAB), 32, 48) and torch.isfinite(out).all()
    finally:
        reference.float()
        reference.configure(decode="soft", output="patch", bg_thresh=None)


# ------------------------------------------------------------------------------------------
# method configs


@pytest.mark.parametrize("method", ["pgseg", "groupvit", "pgseg_lposs_plus"])
def test_method_configs_are_valid(method):
    cfg = load_method(method)
    name, kwargs = stage_kwargs(cfg.predictor)
    assert name in ("pgseg", "groupvit")
    for dataset in ("voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff", "cityscapes", "ade20k"):
        dataset_protocol(cfg, dataset)
    # the predictor options of the config build (tiny random weights instead of the release file)
    kwargs.update(pretrained="random", trust_checkpoint=False, **TINY)
    pred = build_predictor(name, **kwargs)
    for options in cfg.datasets.values():
        if "predictor" in options:
            pred.configure(**options.predictor)
