"""CLIP-family predictors against an independent, from-the-formulas computation.

A tiny random CLIP is written to disk in OpenAI's format (fp16 tensors, OpenAI key names, a width
and depth unlike ViT-B) and loaded through `pretrained=PATH`, the path users take. The reference
below uses only plain torch ops on the state-dict tensors and the methods' formulas (each paper's last
block, as its authors' code runs it: SCLIP b56bd30, ClearCLIP ad68a40, NACLIP 0cac3a6, MaskCLIP as in LPOSS
e489a74); it shares no code with the plugin.
"""

from __future__ import annotations

import math
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ovseg import build_predictor
from ovseg.errors import ConfigError, WeightsError
from ovseg.pipeline.vocabulary import Vocabulary

METHODS = ["clip", "maskclip", "sclip", "clearclip", "naclip"]
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

# tiny OpenAI-format CLIP: ViT width 128 (2 heads of 64, as every OpenAI loader infers), 3 layers,
# patch 16 at 224 (grid 14); text width 64 (1 head), 2 layers; joint embedding 48
V_WIDTH, V_LAYERS, PATCH, GRID0 = 128, 3, 16, 14
T_WIDTH, T_LAYERS, EMBED, CTX, VOCAB = 64, 2, 48, 77, 49408


# ------------------------------------------------------------------------------------------
# the tiny checkpoint


def _block_tensors(prefix: str, width: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    def rn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    in_w = rn(3 * width, width, std=width**-0.5)
    in_w[: 2 * width] *= 3.0  # sharper q/k so attention is far from uniform
    return {
        f"{prefix}.attn.in_proj_weight": in_w,
        f"{prefix}.attn.in_proj_bias": rn(3 * width, std=0.1),
        f"{prefix}.attn.out_proj.weight": rn(width, width, std=width**-0.5),
        f"{prefix}.attn.out_proj.bias": rn(width, std=0.1),
        f"{prefix}.ln_1.weight": 1 + rn(width, std=0.2),
        f"{prefix}.ln_1.bias": rn(width, std=0.1),
        f"{prefix}.mlp.c_fc.weight": rn(4 * width, width, std=width**-0.5),
        f"{prefix}.mlp.c_fc.bias": rn(4 * width, std=0.1),
        f"{prefix}.mlp.c_proj.weight": rn(width, 4 * width, std=(4 * width) ** -0.5),
        f"{prefix}.mlp.c_proj.bias": rn(width, std=0.1),
        f"{prefix}.ln_2.weight": 1 + rn(width, std=0.2),
        f"{prefix}.ln_2.bias": rn(width, std=0.1),
    }


def make_openai_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    sd = {
        "visual.class_embedding": rn(V_WIDTH, std=V_WIDTH**-0.5),
        "visual.positional_embedding": rn(GRID0 * GRID0 + 1, V_WIDTH, std=0.5),
        "visual.proj": rn(V_WIDTH, EMBED, std=V_WIDTH**-0.5),
        "visual.conv1.weight": rn(V_WIDTH, 3, PATCH, PATCH, std=(3 * PATCH * PATCH) ** -0.5),
        "visual.ln_pre.weight": 1 + rn(V_WIDTH, std=0.2),
        "visual.ln_pre.bias": rn(V_WIDTH, std=0.1),
        "visual.ln_post.weight": 1 + rn(V_WIDTH, std=0.2),
        "visual.ln_post.bias": rn(V_WIDTH, std=0.1),
        "positional_embedding": rn(CTX, T_WIDTH, std=0.1),
        "text_projection": rn(T_WIDTH, EMBED, std=T_WIDTH**-0.5),
        "logit_scale": torch.tensor(math.log(100.0)),
        "token_embedding.weight": rn(VOCAB, T_WIDTH, std=0.5),
        "ln_final.weight": 1 + rn(T_WIDTH, std=0.2),
        "ln_final.bias": rn(T_WIDTH, std=0.1),
    }
    for i in range(V_LAYERS):
        sd.update(_block_tensors(f"visual.transformer.resblocks.{i}", V_WIDTH, g))
    for i in range(T_LAYERS):
        sd.update(_block_tensors(f"transformer.resblocks.{i}", T_WIDTH, g))
    # OpenAI ships fp16 (build_model's convert_weights); keep it so the loader's cast is exercised
    return {k: v.half() for k, v in sd.items()}


@pytest.fixture(scope="module")
def openai_sd():
    return make_openai_state_dict()


@pytest.fixture(scope="module")
def ckpt(openai_sd, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-openai.pt"
    torch.save(openai_sd, path)
    return path


@pytest.fixture(scope="module")
def ref_sd(openai_sd):
    return {k: v.float() for k, v in openai_sd.items()}


@pytest.fixture(scope="module")
def predictors(ckpt):
    return {m: build_predictor(m, pretrained=str(ckpt), templates="single") for m in METHODS}


# ------------------------------------------------------------------------------------------
# independent reference (the methods' last blocks, plain torch on the state dict)


def ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def qkv(x, sd, p, heads):
    y = ln(x, sd, p + ".ln_1") @ sd[p + ".attn.in_proj_weight"].T + sd[p + ".attn.in_proj_bias"]
    b, n, d3 = y.shape
    q, k, v = y.split(d3 // 3, dim=-1)
    return [t.reshape(b, n, heads, -1).transpose(1, 2) for t in (q, k, v)]


def attend(a, b, v, bias=0.0):
    w = a @ b.transpose(-1, -2) * a.shape[-1] ** -0.5 + bias
    return w.softmax(-1) @ v


def out_proj(o, sd, p):
    b, h, n, hd = o.shape
    return o.transpose(1, 2).reshape(b, n, h * hd) @ sd[p + ".attn.out_proj.weight"].T + sd[p + ".attn.out_proj.bias"]


def mlp(y, sd, p):
    h = quick_gelu(ln(y, sd, p + ".ln_2") @ sd[p + ".mlp.c_fc.weight"].T + sd[p + ".mlp.c_fc.bias"])
    return h @ sd[p + ".mlp.c_proj.weight"].T + sd[p + ".mlp.c_proj.bias"]


def vanilla_block(x, sd, p, heads, mask=0.0):
    q, k, v = qkv(x, sd, p, heads)
    x = x + out_proj(attend(q, k, v, mask), sd, p)
    return x + mlp(x, sd, p)


def gaussian_bias(h, w, std):
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    c = torch.stack([ys.flatten(), xs.flatten()], 1).float()
    d2 = ((c[:, None] - c[None]) ** 2).sum(-1)
    g = torch.zeros(h * w + 1, h * w + 1)
    g[1:, 1:] = torch.exp(-d2 / (2 * std**2))
    return g


def last_block(method, x, sd, p, heads, grid, std=5.0):
    if method == "clip":
        return vanilla_block(x, sd, p, heads)
    q, k, v = qkv(x, sd, p, heads)
    if method == "maskclip":
        d = x.shape[-1]
        val = ln(x, sd, p + ".ln_1") @ sd[p + ".attn.in_proj_weight"][2 * d :].T + sd[p + ".attn.in_proj_bias"][2 * d :]
        y = x + val @ sd[p + ".attn.out_proj.weight"].T + sd[p + ".attn.out_proj.bias"]
        return y + mlp(y, sd, p)
    if method == "sclip":
        y = x + out_proj(attend(q, q, v) + attend(k, k, v), sd, p)
        return y + mlp(y, sd, p)
    if method == "clearclip":
        return out_proj(attend(q, q, v), sd, p)
    if method == "naclip":
        return out_proj(attend(k, k, v, gaussian_bias(*grid, std)), sd, p)
    raise AssertionError(method)


def ref_pos(sd, grid, mode):
    pos = sd["visual.positional_embedding"]
    if grid == (GRID0, GRID0) or (mode == "dino" and grid[0] * grid[1] == GRID0 * GRID0):
        return pos  # the SCLIP family (DINO-style mode) resamples only when the token count changes
    h, w = grid
    patch = pos[1:].reshape(1, GRID0, GRID0, -1).permute(0, 3, 1, 2)
    if mode == "size":
        patch = F.interpolate(patch, size=(h, w), mode="bicubic", align_corners=False)
    else:
        patch = F.interpolate(patch, scale_factor=((h + 0.1) / GRID0, (w + 0.1) / GRID0), mode="bicubic", align_corners=False)
    assert patch.shape[-2:] == (h, w)
    return torch.cat([pos[:1], patch.permute(0, 2, 3, 1).reshape(h * w, -1)])


def ref_fit(x, grid):
    """Normalised images fitted to the patch grid: `pad` zeros bottom/right (LPOSS), `floor` drops the
    remainder (SCLIP, NACLIP: the stride-16 conv), `center` zeros on both sides (ClearCLIP `compute_padsize`)."""
    hh, ww = x.shape[-2:]
    if grid == "floor":
        return x[..., : hh // PATCH * PATCH, : ww // PATCH * PATCH]
    dh, dw = (-hh) % PATCH, (-ww) % PATCH
    if grid == "pad":
        return F.pad(x, (0, dw, 0, dh))
    return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))


def ref_image_features(sd, images, method, pos_mode=None, std=5.0, grid="pad"):
    """(B, h, w, E) normalised patch features."""
    heads = V_WIDTH // 64
    x = ref_fit((images - MEAN) / STD, grid)
    x = F.conv2d(x, sd["visual.conv1.weight"], stride=PATCH)
    b, d, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(b, 1, d), x], 1)
    pos_mode = pos_mode or ("size" if method == "maskclip" else "dino")
    x = ln(x + ref_pos(sd, (gh, gw), pos_mode), sd, "visual.ln_pre")
    for i in range(V_LAYERS - 1):
        x = vanilla_block(x, sd, f"visual.transformer.resblocks.{i}", heads)
    x = last_block(method, x, sd, f"visual.transformer.resblocks.{V_LAYERS - 1}", heads, (gh, gw), std)
    f = ln(x[:, 1:], sd, "visual.ln_post") @ sd["visual.proj"]
    return F.normalize(f, dim=-1).reshape(b, gh, gw, -1)


def ref_encode_text(sd, tokens):
    heads = T_WIDTH // 64
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]
    causal = torch.full((CTX, CTX), float("-inf")).triu(1)
    for i in range(T_LAYERS):
        x = vanilla_block(x, sd, f"transformer.resblocks.{i}", heads, causal)
    x = ln(x, sd, "ln_final")
    return x[torch.arange(len(tokens)), tokens.argmax(-1)] @ sd["text_projection"]


def ref_text(sd, names, templates):
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer(context_length=CTX)
    out = []
    for n in names:
        e = F.normalize(ref_encode_text(sd, tok([t.format(n) for t in templates])), dim=-1)
        out.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(out)


def ref_scores(sd, images, method, names, grid="pad", **kw):
    feats = ref_image_features(sd, images, method, grid=grid, **kw)
    text = ref_text(sd, names, ["a photo of a {}."])
    scores = torch.einsum("bhwe,qe->bqhw", feats, text)
    hh, ww = images.shape[-2:]
    if grid == "center" and (hh % PATCH or ww % PATCH):  # ClearCLIP: upsample to the padded size, crop back
        dh, dw = (-hh) % PATCH, (-ww) % PATCH
        up = F.interpolate(scores, size=(hh + dh, ww + dw), mode="bilinear", align_corners=False)
        scores = up[..., dh // 2 : dh // 2 + hh, dw // 2 : dw // 2 + ww]
    return scores


#: each method's patch-grid policy in its authors' code
GRIDS = {"clip": "pad", "maskclip": "pad", "sclip": "floor", "clearclip": "center", "naclip": "floor"}


NAMES = ["cat", "dog, puppy", "sky", "grass"]  # 5 names with the synonym


def _images(h, w, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(b, 3, h // 8 + 1, w // 8 + 1, generator=g)
    smooth = F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    return (0.7 * smooth + 0.3 * torch.rand(b, 3, h, w, generator=g)).clamp(0, 1)


# ------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", [(224, 224), (224, 336), (200, 300), (112, 96), (112, 448)])
def test_scores_match_independent_reference(predictors, ref_sd, method, size):
    """224²: no interpolation; 224x336: interpolation; 200x300: the grid policy too; 112x96: a smaller grid;
    112x448: 7x28 = 196 patches, where the SCLIP family keeps the 14x14 table (it checks the token count)."""
    pred = predictors[method]
    assert pred.grid == GRIDS[method]
    pred.set_classes(NAMES)
    images = _images(*size)
    got = pred(images)
    want = ref_scores(ref_sd, images, method, Vocabulary(NAMES).names, grid=GRIDS[method])
    expected = {
        "pad": (math.ceil(size[0] / 16), math.ceil(size[1] / 16)),
        "floor": (size[0] // 16, size[1] // 16),
        "center": size if size[0] % 16 or size[1] % 16 else (size[0] // 16, size[1] // 16),
    }[GRIDS[method]]
    assert got.shape == want.shape == (2, 5, *expected)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("grid", ["pad", "floor", "center"])
def test_grid_policy_is_an_option_and_each_policy_is_discriminative(ckpt, ref_sd, grid):
    """Any predictor takes any policy; on a 200x300 window the three policies give different maps."""
    pred = build_predictor("sclip", pretrained=str(ckpt), templates="single", grid=grid)
    pred.set_classes(NAMES)
    images = _images(200, 300)
    names = Vocabulary(NAMES).names
    got = pred(images)
    torch.testing.assert_close(got, ref_scores(ref_sd, images, "sclip", names, grid=grid), atol=2e-5, rtol=0)
    for other in {"pad", "floor", "center"} - {grid}:
        want = ref_scores(ref_sd, images, "sclip", names, grid=other)
        assert want.shape != got.shape or (want - got).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="grid must be one of pad, floor, center"):
        pred.configure(grid="ceil")
    assert pred.grid == grid  # a refused value leaves the predictor as it was


@pytest.mark.parametrize("method", ["maskclip", "sclip"])
def test_positional_interpolation_mode_is_discriminative(predictors, ref_sd, method):
    """The reference with the other interpolation mode must disagree: the check above has teeth."""
    pred = predictors[method]
    pred.set_classes(NAMES)
    images = _images(224, 336)
    wrong = "dino" if method == "maskclip" else "size"
    other = ref_scores(ref_sd, images, method, Vocabulary(NAMES).names, pos_mode=wrong)
    assert (pred(images) - other).abs().max() > 1e-3


def test_naclip_gaussian_std(ckpt, ref_sd):
    images = _images(160, 192)
    pred = build_predictor("naclip", pretrained=str(ckpt), templates="single", gaussian_std=2.0)
    pred.set_classes(NAMES)
    got = pred(images)
    names = Vocabulary(NAMES).names
    torch.testing.assert_close(got, ref_scores(ref_sd, images, "naclip", names, std=2.0), atol=2e-5, rtol=0)
    assert (got - ref_scores(ref_sd, images, "naclip", names, std=5.0)).abs().max() > 1e-3


def test_methods_differ(predictors):
    images = _images(224, 288)
    outs = {}
    for m in METHODS:
        predictors[m].set_classes(NAMES)
        outs[m] = predictors[m](images)
    for i, a in enumerate(METHODS):
        for b in METHODS[i + 1 :]:
            assert (outs[a] - outs[b]).abs().max() > 1e-2, (a, b)


def test_shape_dtype_and_contract(predictors):
    pred = predictors["sclip"]
    assert pred.patch_size == 16
    assert pred.random_weights is False
    pred.set_classes(["a, b, c", ["d", "e"], "f"])
    for h, w in [(16, 16), (17, 33), (64, 100)]:
        out = pred(torch.rand(3, 3, h, w))
        assert out.shape == (3, 6, h // 16, w // 16)  # SCLIP's floor grid
        assert out.dtype == torch.float32
        assert out.abs().max() <= 1 + 1e-5  # raw cosines: no temperature, no softmax


def test_architecture_read_from_openai_checkpoint(predictors):
    pred = predictors["clip"]
    assert "architecture read from the checkpoint" in pred.weights_source
    visual = pred.clip.visual
    assert visual.conv1.out_channels == V_WIDTH and len(visual.transformer.resblocks) == V_LAYERS
    assert visual.transformer.resblocks[0].attn.num_heads == 2
    assert type(visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert next(pred.parameters()).dtype == torch.float32  # fp16 checkpoint, fp32 model


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_close_to_float32(method):
    """The engine may cast the module to bfloat16; scores stay float32 and close to fp32.

    Uses open_clip's default init (the sharp synthetic checkpoint amplifies bf16 rounding).
    """
    pred = build_predictor(method, model="ovseg-tiny-vit", pretrained="random", templates="single")
    pred.set_classes(NAMES)
    images = _images(160, 208)
    ref = pred(images)
    pred.to(torch.bfloat16)
    pred.set_classes(NAMES)  # re-encoded in bf16 (the cache is keyed by dtype)
    out = pred(images)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out - ref).abs().max() < 0.02
    assert torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1] > 0.999


def test_precision_is_a_run_setting_not_a_predictor_option(ckpt):
    """`precision` went to `ovseg.runtime`: the predictor refuses it; `place` casts, scores stay float32."""
    from ovseg.errors import PluginError
    from ovseg.pipeline.refiners import NoRefiner
    from ovseg.pipeline.segmenter import Segmenter
    from ovseg.runtime import place

    with pytest.raises(PluginError, match="precision"):
        build_predictor("sclip", pretrained=str(ckpt), templates="single", precision="bf16")
    pred = build_predictor("sclip", pretrained=str(ckpt), templates="single")
    seg = place(Segmenter(pred, NoRefiner()), torch.device("cpu"), "bf16-true")
    assert next(pred.parameters()).dtype == torch.bfloat16
    pred.set_classes(NAMES)
    assert pred(_images(48, 64)).dtype == torch.float32
    assert seg.refiner is not None


def test_text_embedding_recipe_imagenet80(ckpt, ref_sd):
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    templates = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert len(templates) == 80
    assert templates[0] == "a bad photo of a {}." and templates[-1] == "a tattoo of the {}."
    pred = build_predictor("clip", pretrained=str(ckpt), text_batch_size=50)
    names = ["traffic light", "cat"]
    pred.set_classes(names)
    want = ref_text(ref_sd, names, templates)
    torch.testing.assert_close(pred.text_embeddings, want, atol=2e-5, rtol=0)
    # mean of normalised embeddings differs from normalised mean of raw embeddings: the recipe matters
    from open_clip.tokenizer import SimpleTokenizer

    raw = ref_encode_text(ref_sd, SimpleTokenizer()([t.format("cat") for t in templates]))
    assert (F.normalize(raw.mean(0), dim=-1) - want[1]).abs().max() > 1e-4


def test_text_cache_encodes_each_name_once(ckpt, monkeypatch):
    pred = build_predictor("maskclip", pretrained=str(ckpt), templates="single")
    calls = []
    original = pred.encode_names
    monkeypatch.setattr(pred, "encode_names", lambda names: calls.append(list(names)) or original(names))
    pred.set_classes(["cat", "dog, puppy"])
    first = pred.text_embeddings.clone()
    pred.set_classes(Vocabulary(["cat", "dog, puppy"]))
    pred.set_classes(["sky", "cat"])
    assert calls == [["cat", "dog", "puppy"], ["sky"]]
    pred.set_classes(["cat", "dog, puppy"])
    torch.testing.assert_close(pred.text_embeddings, first)


def test_predict_before_set_classes_is_an_error(ckpt):
    pred = build_predictor("clip", pretrained=str(ckpt), templates="single")
    with pytest.raises(RuntimeError, match="set_classes"):
        pred(torch.rand(1, 3, 32, 32))


# ---- checkpoint formats ------------------------------------------------------------------


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _module_tree(sd):
    root = _Holder()
    for key, value in sd.items():
        *path, leaf = key.split(".")
        m = root
        for p in path:
            if p not in m._modules:
                m.add_module(p, _Holder())
            m = m._modules[p]
        if value.is_floating_point():
            m.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        else:
            m.register_buffer(leaf, value.clone())
    return root


def test_torchscript_checkpoint(openai_sd, ref_sd, tmp_path):
    """OpenAI's release format: a TorchScript archive whose state dict also holds a few int entries."""
    sd = dict(openai_sd)
    sd.update(input_resolution=torch.tensor(224), context_length=torch.tensor(CTX), vocab_size=torch.tensor(VOCAB))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            scripted = torch.jit.script(_module_tree(sd))
        except Exception as exc:  # pragma: no cover - depends on TorchScript still existing
            pytest.skip(f"TorchScript unavailable: {exc}")
        path = tmp_path / "ViT-tiny.pt"
        torch.jit.save(scripted, str(path))
        pred = build_predictor("sclip", pretrained=str(path), templates="single")
    pred.set_classes(NAMES)
    images = _images(96, 128)
    torch.testing.assert_close(pred(images), ref_scores(ref_sd, images, "sclip", Vocabulary(NAMES).names), atol=2e-5, rtol=0)


def test_wrapped_state_dict_and_safetensors(openai_sd, ref_sd, tmp_path):
    images = _images(64, 80)
    names = Vocabulary(NAMES).names
    want = ref_scores(ref_sd, images, "clearclip", names)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in openai_sd.items()}}, wrapped)
    paths = [wrapped]
    try:
        from safetensors.torch import save_file

        st = tmp_path / "tiny.safetensors"
        save_file({k: v.contiguous() for k, v in openai_sd.items()}, str(st))
        paths.append(st)
    except ImportError:  # pragma: no cover
        pass
    for path in paths:
        pred = build_predictor("clearclip", pretrained=str(path), templates="single")
        pred.set_classes(NAMES)
        torch.testing.assert_close(pred(images), want, atol=2e-5, rtol=0)


def test_open_clip_checkpoint_fits_named_config(tmp_path):
    """A checkpoint that fits `model` loads into that config (its activation, not QuickGELU)."""
    rand = build_predictor("maskclip", model="ovseg-tiny-vit", pretrained="random", templates="single")
    assert rand.random_weights is True
    path = tmp_path / "open_clip_tiny.pt"
    torch.save(rand.clip.state_dict(), path)
    loaded = build_predictor("maskclip", model="ovseg-tiny-vit", pretrained=str(path), templates="single")
    assert loaded.random_weights is False and "into ovseg-tiny-vit" in loaded.weights_source
    assert type(loaded.clip.visual.transformer.resblocks[0].mlp.gelu) is nn.GELU
    for p in (rand, loaded):
        p.set_classes(["cat", "dog"])
    images = _images(64, 64)
    torch.testing.assert_close(rand(images), loaded(images))
    forced = build_predictor("maskclip", model="ovseg-tiny-vit", pretrained=str(path), quick_gelu=True)
    assert type(forced.clip.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_random_weights_are_seeded():
    a = build_predictor("naclip", model="ovseg-tiny-vit", pretrained="random", templates="single")
    b = build_predictor("naclip", model="ovseg-tiny-vit", pretrained="random", templates="single")
    c = build_predictor("naclip", model="ovseg-tiny-vit", pretrained="random", templates="single", seed=1)
    images = _images(48, 64)
    outs = []
    for p in (a, b, c):
        p.set_classes(["cat", "dog"])
        outs.append(p(images))
    torch.testing.assert_close(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])


# ---- errors ------------------------------------------------------------------------------


def _assert_helpful(msg: str):
    assert "`ovseg download` with the same --method" in msg and "predictor.pretrained=" in msg, msg


def test_missing_path_raises_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        build_predictor("clip", pretrained=str(tmp_path / "nope" / "ViT-B-16.pt"))


def test_garbage_file_raises_weights_error(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint" * 100)
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint") as info:
        build_predictor("clip", pretrained=str(path))
    assert "trust" not in str(info.value) and "weights_only=False" not in str(info.value)  # damaged, not a pickle


def test_non_clip_state_dict_raises_weights_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(WeightsError, match="not a CLIP checkpoint"):
        build_predictor("clip", pretrained=str(path))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="state dict"):
        build_predictor("clip", pretrained=str(tmp_path / "list.pt"))


def test_unknown_tag_raises_weights_error():
    with pytest.raises(WeightsError) as info:
        build_predictor("clip", model="ViT-B-16", pretrained="not_a_real_tag")
    msg = str(info.value)
    assert "laion2b_s34b_b88k" in msg and "openai" in msg  # lists the known tags
    _assert_helpful(msg)


@pytest.mark.parametrize("how", ["env", "unreachable"])
def test_known_tag_offline_fails_fast(tmp_path, monkeypatch, how):
    from ovseg import weights

    if how == "env":
        monkeypatch.setenv("OVSEG_OFFLINE", "1")
    else:
        monkeypatch.delenv("OVSEG_OFFLINE", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        for name in weights.PROXY_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(weights, "_reachable", lambda host, port=443: False)
    start = time.monotonic()
    with pytest.raises(WeightsError) as info:
        build_predictor("sclip", model="ViT-B-16", pretrained="openai", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    msg = str(info.value)
    assert "offline" in msg and "'openai'" in msg and "`ovseg download` with the same --method" in msg
    _assert_helpful(msg)


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown open_clip model"):
        build_predictor("clip", model="ViT-B-161", pretrained="random")


def test_non_vit_tower_is_a_config_error():
    from open_clip.modified_resnet import ModifiedResNet
    from ovseg_clip.dense import check_vit

    with pytest.raises(ConfigError, match="VisionTransformer"):
        check_vit(ModifiedResNet(layers=(1, 1, 1, 1), output_dim=32, heads=2, image_size=64, width=16))


def test_bad_options_are_config_errors(ckpt):
    with pytest.raises(ConfigError, match="templates"):
        build_predictor("clip", pretrained=str(ckpt), templates="imagenet81")
    with pytest.raises(ConfigError, match="grid must be one of"):
        build_predictor("clip", pretrained=str(ckpt), grid="fp8")
    with pytest.raises(ConfigError, match="gaussian_std"):
        build_predictor("naclip", pretrained=str(ckpt), gaussian_std=0)


# ---- open_clip tags resolved from the local caches (the offline evaluation machine) ------------


def _fake_tag(monkeypatch, cfg):
    import open_clip

    real = open_clip.get_pretrained_cfg
    monkeypatch.setattr(
        open_clip, "get_pretrained_cfg", lambda model, tag: dict(cfg) if tag == "fake_tag" else real(model, tag)
    )


def test_tag_from_url_cache(tmp_path, monkeypatch, openai_sd, ref_sd):
    """A tag whose file sits in open_clip's URL cache loads with no network (OpenAI JIT-style file)."""
    monkeypatch.setenv("OVSEG_OFFLINE", "1")
    _fake_tag(monkeypatch, {"url": "https://example.invalid/abc/tiny-openai.pt", "quick_gelu": True})
    torch.save(openai_sd, tmp_path / "tiny-openai.pt")
    pred = build_predictor("naclip", pretrained="fake_tag", cache_dir=str(tmp_path), templates="single")
    assert "fake_tag" in pred.weights_source
    pred.set_classes(NAMES)
    images = _images(64, 96)
    torch.testing.assert_close(pred(images), ref_scores(ref_sd, images, "naclip", Vocabulary(NAMES).names), atol=2e-5, rtol=0)


def test_tag_from_hf_cache(tmp_path, monkeypatch):
    """A tag cached by huggingface_hub (as `ovseg download` leaves it) loads offline, with the tag's QuickGELU."""
    pytest.importorskip("huggingface_hub")
    from safetensors.torch import save_file

    monkeypatch.setenv("OVSEG_OFFLINE", "1")
    _fake_tag(monkeypatch, {"hf_hub": "ovseg-test/tiny-clip/", "quick_gelu": True, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})
    src = build_predictor("clip", model="ovseg-tiny-vit", pretrained="random", quick_gelu=True, templates="single")
    snap = tmp_path / "models--ovseg-test--tiny-clip" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (tmp_path / "models--ovseg-test--tiny-clip" / "refs").mkdir()
    (tmp_path / "models--ovseg-test--tiny-clip" / "refs" / "main").write_text("0123abcd")
    save_file({k: v.contiguous() for k, v in src.clip.state_dict().items()}, str(snap / "open_clip_model.safetensors"))
    pred = build_predictor("clip", model="ovseg-tiny-vit", pretrained="fake_tag", cache_dir=str(tmp_path), templates="single")
    assert type(pred.clip.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert pred.mean == (0.5, 0.5, 0.5)
    for p in (src, pred):
        p.set_classes(["cat", "dog"])
    images = _images(48, 48)
    assert not torch.allclose(pred(images), src(images), atol=1e-3)  # the tag's mean/std are used
    src.mean, src.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    torch.testing.assert_close(pred(images), src(images))  # otherwise the same weights


def test_autocast_bf16_returns_float32(predictors):
    pred = predictors["clearclip"]
    pred.set_classes(NAMES)
    images = _images(64, 96)
    ref = pred(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pred(images)
    assert out.dtype == torch.float32
    assert torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1] > 0.98
