"""DINO / DINOv2 extractors: features against independent computations from timm's own modules.

Tiny random ViTs only (vit_tiny with 2 blocks); weights are written to temporary files and loaded
through the same `pretrained=PATH` path users take.
"""

import fractions
import math
import time

import pytest
import torch
import torch.nn.functional as F

from ovseg import build_extractor
from ovseg.errors import WeightsError
from ovseg.pipeline.stages import IMAGENET_MEAN, IMAGENET_STD

TINY = dict(model="vit_tiny_patch16_224", pretrained="random", model_kwargs={"depth": 2})
TINY_V2 = dict(
    model="vit_small_patch14_reg4_dinov2",
    pretrained="random",
    model_kwargs={"depth": 2, "embed_dim": 48, "num_heads": 3, "img_size": 70},
)


def perturb(module, seed=0):
    """Random weights everywhere (timm zero-initialises biases and LayerScale, which hides mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return module


def normalise(images):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def hooked_qkv(vit, x):
    """The reference's way: a forward hook on blocks[-1].attn.qkv during timm's own forward."""
    seen = {}
    handle = vit.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: seen.setdefault("qkv", o))
    try:
        vit.forward_features(x)
    finally:
        handle.remove()
    return seen["qkv"]


def reference_features(vit, x, feature, grid):
    """q/k/v from the hooked qkv output reshaped like the LPOSS code (B, T, 3, heads, head_dim)."""
    b, t, c3 = (qkv := hooked_qkv(vit, x)).shape
    heads = vit.blocks[-1].attn.num_heads
    qkv = qkv.reshape(b, t, 3, heads, c3 // 3 // heads).permute(2, 0, 3, 1, 4)
    f = qkv["qkv".index(feature)].transpose(1, 2).flatten(-2)[:, vit.num_prefix_tokens :]
    f = F.normalize(f, dim=-1)
    return f.transpose(1, 2).reshape(b, -1, *grid)


@pytest.mark.parametrize("feature", ["q", "k", "v"])
def test_dino_qkv_features_match_hooked_timm_forward(feature):
    ext = build_extractor("dino", feature=feature, **TINY)
    perturb(ext.vit)
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    out = ext(images)
    assert out.shape == (2, 192, 14, 14) and ext.patch_size == 16 and ext.random_weights
    assert torch.allclose(out, reference_features(ext.vit, normalise(images), feature, (14, 14)), atol=1e-5)
    assert torch.allclose(out.norm(dim=1), torch.ones(2, 14, 14), atol=1e-5)


def test_value_features_from_block_weights():
    """v = LayerNorm(tokens entering the last block) @ W_v^T + b_v, with W_v the last third of qkv."""
    ext = build_extractor("dino", **TINY)
    perturb(ext.vit, seed=3)
    vit = ext.vit
    images = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    seen = {}
    handle = vit.blocks[-1].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    vit.forward_features(normalise(images))
    handle.remove()
    last, c = vit.blocks[-1], vit.embed_dim
    ln = F.layer_norm(seen["x"], (c,), last.norm1.weight, last.norm1.bias, last.norm1.eps)
    v = ln @ last.attn.qkv.weight[2 * c :].T + last.attn.qkv.bias[2 * c :]
    v = F.normalize(v[:, 1:], dim=-1).transpose(1, 2).reshape(1, c, 14, 14)
    assert torch.allclose(ext(images), v, atol=1e-5)


def test_x_feature_is_the_normed_block_output():
    ext = build_extractor("dino", feature="x", **TINY)
    perturb(ext.vit, seed=4)
    images = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(5))
    ext.pos_interpolation = "timm"  # timm's forward_features resamples the same way
    tokens = ext.vit.forward_features(normalise(images))[:, 1:]
    expected = F.normalize(tokens, dim=-1).transpose(1, 2).reshape(1, 192, 4, 3)
    assert torch.allclose(ext(images), expected, atol=1e-5)


def test_odd_sizes_pad_and_interpolate_like_dino():
    """Non-multiple-of-16 input: zero-padded after normalisation, DINO's +0.1 bicubic pos-embed resize."""
    ext = build_extractor("dino", **TINY)
    perturb(ext.vit, seed=6)
    vit = ext.vit
    images = torch.rand(2, 3, 70, 100, generator=torch.Generator().manual_seed(7))
    out = ext(images)
    assert out.shape == (2, 192, math.ceil(70 / 16), math.ceil(100 / 16))
    # independent: pad, then DINO's interpolate_pos_encoding written out, then timm's blocks
    x = F.pad(normalise(images), (0, 112 - 100, 0, 80 - 70))
    h, w = 5, 7
    pos = vit.pos_embed[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, scale_factor=((h + 0.1) / 14, (w + 0.1) / 14), mode="bicubic", align_corners=False)
    pos = torch.cat([vit.pos_embed[:, :1], pos.flatten(2).transpose(1, 2)], dim=1)
    tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([vit.cls_token.expand(2, -1, -1), tokens], dim=1) + pos
    tokens = vit.blocks[0](tokens)
    last = vit.blocks[1]
    v = last.attn.qkv(last.norm1(tokens))[..., 2 * 192 :][:, 1:]
    expected = F.normalize(v, dim=-1).transpose(1, 2).reshape(2, 192, h, w)
    assert torch.allclose(out, expected, atol=1e-5)


def test_dinov2_registers_dropped_and_timm_interpolation():
    ext = build_extractor("dinov2", **TINY_V2)
    perturb(ext.vit, seed=8)
    vit = ext.vit
    assert ext.patch_size == 14 and vit.num_prefix_tokens == 5
    images = torch.rand(1, 3, 50, 61, generator=torch.Generator().manual_seed(9))
    out = ext(images)
    assert out.shape == (1, 48, 4, 5)
    x = F.pad(normalise(images), (0, 70 - 61, 0, 56 - 50))
    assert torch.allclose(out, reference_features(vit, x, "v", (4, 5)), atol=1e-5)


def test_bfloat16_runs_and_stays_close():
    ext = build_extractor("dino", **TINY)
    images = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(10))
    ref = ext(images)
    out = ext.to(torch.bfloat16)(images)
    assert out.dtype == torch.float32 and out.shape == ref.shape  # bf16 weights, float32 features (the contract)
    assert F.cosine_similarity(out.float(), ref, dim=1).min() > 0.98


def test_random_weights_are_reproducible():
    a, b = build_extractor("dino", **TINY), build_extractor("dino", **TINY)
    images = torch.rand(1, 3, 32, 32)
    assert torch.equal(a(images), b(images))


@pytest.mark.parametrize("layout", ["timm", "dino_teacher", "safetensors"])
def test_local_checkpoints_load(tmp_path, layout):
    src = perturb(build_extractor("dino", **TINY), seed=11)
    state = {k: v.clone() for k, v in src.vit.state_dict().items()}
    if layout == "timm":
        path = tmp_path / "w.pth"
        torch.save(state | {"head.weight": torch.zeros(10, 192), "head.bias": torch.zeros(10)}, path)
    elif layout == "dino_teacher":  # a DINO training checkpoint: teacher with DDP/backbone prefixes, args
        import argparse

        path = tmp_path / "full.pth"
        torch.save({"teacher": {f"module.backbone.{k}": v for k, v in state.items()}, "epoch": 3,
                    "args": argparse.Namespace(arch="vit_tiny")}, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    ext = build_extractor("dino", model="vit_tiny_patch16_224", pretrained=str(path), model_kwargs={"depth": 2})
    assert not ext.random_weights
    images = torch.rand(1, 3, 64, 64)
    assert torch.equal(ext(images), src(images))


def test_original_dinov2_checkpoint_is_converted(tmp_path):
    src = perturb(build_extractor("dinov2", **TINY_V2), seed=12)
    s = src.vit.state_dict()
    cls_pos = 0.1 * torch.randn(1, 1, 48)  # the original keeps a position for the class token
    original = {k: v for k, v in s.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    original.update(
        cls_token=s["cls_token"] - cls_pos,
        register_tokens=s["reg_token"],
        pos_embed=torch.cat([cls_pos, s["pos_embed"]], dim=1),
        mask_token=torch.zeros(1, 48),
    )
    torch.save(original, tmp_path / "dinov2.pth")
    ext = build_extractor("dinov2", **(TINY_V2 | {"pretrained": str(tmp_path / "dinov2.pth")}))
    images = torch.rand(1, 3, 42, 42)
    assert torch.allclose(ext(images), src(images), atol=1e-6)


def test_missing_weights_fail_fast_with_one_clear_message(tmp_path):
    start = time.monotonic()
    with pytest.raises(WeightsError) as err:
        build_extractor("dino", model="vit_small_patch16_224.dino")  # pretrained=True, offline, no cache
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "vit_small_patch16_224.dino" in msg and "ovseg download" in msg and "extractor.pretrained" in msg
    with pytest.raises(WeightsError, match="does not exist"):
        build_extractor("dino", pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsError, match="no pretrained weights"):
        build_extractor("dino", pretrained="no_such_tag")
    # a pickle with arbitrary objects is refused (weights_only=True)
    torch.save({"model": {"x": torch.zeros(1)}, "evil": fractions.Fraction(1, 3)}, tmp_path / "obj.pth")
    with pytest.raises(WeightsError, match="weights_only"):
        build_extractor("dino", pretrained=str(tmp_path / "obj.pth"), model="vit_tiny_patch16_224")
    # a checkpoint of another architecture is named as not fitting
    torch.save({"blocks.0.norm1.weight": torch.ones(7)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="does not fit"):
        build_extractor("dino", pretrained=str(tmp_path / "other.pth"), **{k: v for k, v in TINY.items() if k != "pretrained"})
