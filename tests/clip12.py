"""A tiny 12-layer OpenAI-format CLIP and plain-torch reference pieces for the multi-layer methods.

SC-CLIP's and ResCLIP's defaults index blocks of a 12-layer ViT, so their tests need 12 blocks; the
tower is otherwise the tiny one of `test_clip_predictors` (width 128 = 2 heads of 64, patch 16, grid 14;
its text tower). Everything here is plain torch on the state-dict tensors, sharing no code with the plugin.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovseg.pipeline.vocabulary import Vocabulary
from tests.test_clip_predictors import GRID0, PATCH, V_WIDTH, _block_tensors, ln, make_openai_state_dict
from tests.test_clip_predictors import mlp, out_proj, qkv, ref_pos, ref_text

LAYERS = 12
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI's constants, exact in float64
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEADS = V_WIDTH // 64


def make_state_dict12(seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny checkpoint with 12 vision blocks (fp16, as OpenAI ships and every loader rounds)."""
    sd = {k: v.float() for k, v in make_openai_state_dict(seed).items() if not k.startswith("visual.transformer.")}
    g = torch.Generator().manual_seed(seed + 12)
    for i in range(LAYERS):
        sd.update(_block_tensors(f"visual.transformer.resblocks.{i}", V_WIDTH, g))
    return {k: v.half() for k, v in sd.items()}


def fixtures(names):
    """Module-scoped fixtures `ckpt12` (the checkpoint's path), `ref_sd` (its tensors in float64) and `text` (the
    float64 embeddings of the names, one template), for a test module to bind: `ckpt12, ref_sd, text = fixtures(...)`."""

    @pytest.fixture(scope="module")
    def ckpt12(tmp_path_factory):
        path = tmp_path_factory.mktemp("clip12") / "tiny12-openai.pt"
        torch.save(make_state_dict12(), path)
        return str(path)

    @pytest.fixture(scope="module")
    def ref_sd(ckpt12):
        return {k: v.double() for k, v in torch.load(ckpt12, weights_only=True).items()}

    @pytest.fixture(scope="module")
    def text(ref_sd):
        return ref_text(ref_sd, Vocabulary(names).names, ["a photo of a {}."])

    return ckpt12, ref_sd, text


def block_name(i: int) -> str:
    return f"visual.transformer.resblocks.{i}"


def normalised(images: torch.Tensor) -> torch.Tensor:
    """CLIP normalisation in the images' dtype (float64 tests use the exact constants)."""
    mean = torch.tensor(CLIP_MEAN, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def embed(sd, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Tokens entering block 0 of normalised images x (B, 3, 16h, 16w); the table is kept unchanged when
    the grid has 196 patches (the authors test the token count), DINO-style resampling otherwise."""
    x = F.conv2d(x, sd["visual.conv1.weight"], stride=PATCH)
    b, d, h, w = x.shape
    x = torch.cat([sd["visual.class_embedding"].expand(b, 1, d), x.flatten(2).transpose(1, 2)], 1)
    pos = sd["visual.positional_embedding"]
    if h * w != GRID0 * GRID0:  # resampled in float32, as every implementation does
        pos = ref_pos({"visual.positional_embedding": pos.float()}, (h, w), "dino").to(pos.dtype)
    return ln(x + pos, sd, "visual.ln_pre"), (h, w)


def attention(q, k):
    """softmax(q s kᵀ) per head."""
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).softmax(-1)


def block(sd, x, i):
    """Block i unchanged; returns its output and its attention probabilities."""
    q, k, v = qkv(x, sd, block_name(i), HEADS)
    a = attention(q, k)
    y = x + out_proj(a @ v, sd, block_name(i))
    return y + mlp(y, sd, block_name(i)), a


def final_features(sd, tokens):
    """ln_post, proj, L2-normalise: (B, n, E)."""
    return F.normalize(ln(tokens, sd, "visual.ln_post") @ sd["visual.proj"], dim=-1)


def bfloat16_scores(pred, names, images):
    """Scores of a float32 predictor, then of the same predictor cast to bfloat16 (what `--precision bf16-true`
    does); asserts the contract (float32 scores, same shape, finite) and returns both."""
    pred.set_classes(names)
    ref = pred(images)
    pred.to(torch.bfloat16)
    pred.set_classes(names)  # re-encoded in bfloat16 (the text cache is keyed by dtype)
    out = pred(images)
    assert out.dtype == torch.float32 and out.shape == ref.shape and torch.isfinite(out).all()
    return ref, out
