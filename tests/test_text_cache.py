"""Text encoding: prompts cut after their pooled token give open_clip's full-context embeddings, towers where
that is not exact keep the full context, and the disk cache of per-name embeddings is keyed, atomic, repaired
when damaged, switchable, and shown/cleared by `ovseg cache`."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from ovseg import build_predictor, text_cache
from ovseg.cli.main import main
from ovseg.pipeline.text import encode_by_length

PROMPTS = ["a photo of a cat.", "sky", "a blurry photo of the large traffic light next to the road.", "dog",
           "an origami potted plant.", "a tattoo of the tvmonitor."] * 3


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private, empty ovseg cache for one test."""
    monkeypatch.setenv("OVSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(text_cache.ENV, raising=False)
    return tmp_path / "cache" / "text"


def _sharp_clip(seed: int = 0):
    """A tiny open_clip CLIP whose text attention is far from uniform (so dropped keys would show)."""
    from ovseg_clip.weights import create_random

    clip = create_random("ovseg-tiny-vit", False, seed).eval()
    with torch.no_grad():
        for blk in clip.transformer.resblocks:
            blk.attn.in_proj_weight[: 2 * blk.attn.embed_dim] *= 4.0
            blk.ln_1.bias.normal_(0, 0.2)
        clip.positional_embedding.normal_(0, 0.5)
    return clip


def _tokens(prompts):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=77)(prompts)


class Spy:
    """Records the sequence lengths a text transformer is called with."""

    def __init__(self, module):
        self.lengths = []
        module.register_forward_pre_hook(lambda m, args, kwargs: self.lengths.append(args[0].shape[1]), with_kwargs=True)


# ---- truncation ----------------------------------------------------------------------------------------------


def test_truncated_batches_equal_open_clip_full_context():
    from ovseg_clip.text import encode_tokens, truncation_problem

    clip = _sharp_clip()
    tokens = _tokens(PROMPTS)
    assert truncation_problem(clip) is None
    with torch.no_grad():
        want = F.normalize(clip.encode_text(tokens), dim=-1)
        spy = Spy(clip.transformer)
        got = F.normalize(encode_tokens(clip, tokens, batch_size=4), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    longest = int(tokens.argmax(-1).max()) + 1
    assert len(spy.lengths) == 5 and max(spy.lengths) == longest < 77
    assert spy.lengths == sorted(spy.lengths) and min(spy.lengths) <= 4  # sorted by length: short batches first


def test_towers_without_causal_mask_or_token_pooling_keep_full_context():
    from ovseg_clip.text import _encode_truncated, encode_tokens, truncation_problem

    tokens = _tokens(PROMPTS)
    bidirectional = _sharp_clip()
    bidirectional.attn_mask = torch.zeros_like(bidirectional.attn_mask)
    assert "not causal" in truncation_problem(bidirectional)
    with torch.no_grad():
        want = bidirectional.encode_text(tokens)
        spy = Spy(bidirectional.transformer)
        torch.testing.assert_close(encode_tokens(bidirectional, tokens, 4), want, atol=1e-6, rtol=0)
        assert spy.lengths == [77] * 5
        # truncating this tower would change its embeddings: the check is what keeps them exact
        short = tokens[:, : int(tokens.argmax(-1).max()) + 1]
        assert (_encode_truncated(bidirectional, short) - want).abs().max() > 1e-3
    last = _sharp_clip()
    last.text_pool_type = "last"
    assert "pooling" in truncation_problem(last)
    no_mask = _sharp_clip()
    no_mask.attn_mask = None
    assert "no causal" in truncation_problem(no_mask)


def test_encode_by_length_restores_input_order():
    tokens = torch.tensor([[5, 9, 0, 0], [7, 0, 0, 0], [1, 2, 3, 9], [4, 9, 0, 0]])
    positions = torch.tensor([1, 0, 3, 1])
    seen = []

    def encode(t):
        seen.append(t.shape[1])
        return t.sum(-1, keepdim=True).float()

    out = encode_by_length(tokens, positions, encode, batch_size=2)
    assert seen == [2, 4]  # (prompt 1, prompt 0) cut at 2 tokens; (prompt 3, prompt 2) at 4
    assert out.flatten().tolist() == [14.0, 7.0, 15.0, 13.0]


def test_predictor_text_embeddings_equal_full_context_recipe(cache):
    pred = build_predictor("clip", model="ovseg-tiny-vit", pretrained="random", text_batch_size=37)
    names = ["traffic light", "cat", "potted plant"]
    pred.set_classes(names)
    tokens = pred.tokenizer([t(n) for n in names for t in pred.templates])
    with torch.no_grad():
        emb = F.normalize(pred.clip.encode_text(tokens), dim=-1).view(3, 80, -1).mean(1)
    torch.testing.assert_close(pred.text_embeddings, F.normalize(emb, dim=-1), atol=1e-5, rtol=0)


def test_pgseg_truncated_text_equals_full_context_and_is_cached(cache, tmp_path, monkeypatch):
    from ovseg_pgseg.predictor import GroupViTPredictor

    from tests.test_pgseg import TINY, to_release

    names = ["cat", "traffic light"]
    source = build_predictor("groupvit", pretrained="random", templates="imagenet80", **TINY)
    with torch.no_grad():
        for blk in source.model.text.blocks:
            blk.attn.in_proj.weight.mul_(4.0)
    source.set_classes(names)
    assert not any(cache.rglob("*.emb"))  # unseeded random weights are never cached on disk
    path = tmp_path / "groupvit.pth"
    torch.save({"model": to_release(source.model.state_dict())}, path)
    pred = build_predictor("groupvit", pretrained=str(path), templates="imagenet80", **TINY)
    spy = Spy(pred.model.text.blocks[0])
    pred.set_classes(names)
    assert spy.lengths == [13]  # one batch of 160 prompts, cut after the longest (13 tokens)
    prompts = [t(n) for n in names for t in pred.templates]  # imagenet80: open_clip's callables
    with torch.no_grad():
        full = pred.model.encode_text(_tokens(prompts)).view(2, 80, -1).mean(1)
    torch.testing.assert_close(pred.text_embeddings, F.normalize(full, dim=-1), atol=1e-5, rtol=0)
    encoded = []
    original = GroupViTPredictor._encode_names
    monkeypatch.setattr(GroupViTPredictor, "_encode_names", lambda self, n: encoded.extend(n) or original(self, n))
    again = build_predictor("groupvit", pretrained=str(path), templates="imagenet80", **TINY)
    again.set_classes(names)
    assert encoded == [] and len(list(cache.rglob("*.emb"))) == 2
    torch.testing.assert_close(again.text_embeddings, pred.text_embeddings, atol=0, rtol=0)


# ---- the disk cache --------------------------------------------------------------------------------------------


def _save_tiny(path, seed):
    from ovseg_clip.weights import create_random

    torch.save(create_random("ovseg-tiny-vit", False, seed).state_dict(), path)
    return str(path)


def _counting(monkeypatch):
    from ovseg_clip.predictors import ClipDensePredictor

    encoded = []
    original = ClipDensePredictor._encode_names
    monkeypatch.setattr(ClipDensePredictor, "_encode_names", lambda self, names: encoded.extend(names) or original(self, names))
    return encoded


def test_second_predictor_and_other_methods_on_the_same_file_encode_nothing(cache, tmp_path, monkeypatch):
    ckpt = _save_tiny(tmp_path / "a.pt", 0)
    encoded = _counting(monkeypatch)
    first = build_predictor("maskclip", model="ovseg-tiny-vit", pretrained=ckpt, templates="single")
    first.set_classes(["cat", "dog, puppy"])
    assert encoded == ["cat", "dog", "puppy"]
    for method in ("maskclip", "naclip"):
        other = build_predictor(method, model="ovseg-tiny-vit", pretrained=ckpt, templates="single")
        other.set_classes(["dog, puppy", "cat"])
        torch.testing.assert_close(other.text_embeddings, first.text_embeddings[[1, 2, 0]], atol=0, rtol=0)
    assert encoded == ["cat", "dog", "puppy"]
    assert len(list(cache.rglob("*.emb"))) == 3


@pytest.mark.parametrize("change", ["weights", "seed", "templates", "names", "dtype"])
def test_what_changes_an_embedding_changes_the_entry(cache, tmp_path, monkeypatch, change):
    a, b = _save_tiny(tmp_path / "a.pt", 0), _save_tiny(tmp_path / "b.pt", 1)
    base = dict(model="ovseg-tiny-vit", pretrained=a, templates="single")
    first = build_predictor("clip", **base)
    first.set_classes(["cat"])
    encoded = _counting(monkeypatch)
    names = ["cat"]
    if change == "weights":
        other = build_predictor("clip", **{**base, "pretrained": b})
    elif change == "seed":
        other = build_predictor("clip", **{**base, "pretrained": "random", "seed": 3})
    elif change == "templates":
        other = build_predictor("clip", **{**base, "templates": "imagenet80"})
    elif change == "dtype":
        other = build_predictor("clip", **base).to(torch.bfloat16)
    else:
        other, names = build_predictor("clip", **base), ["dog"]
    other.set_classes(names)
    assert encoded == names
    assert len({p.parent for p in cache.rglob("*.emb")}) == (1 if change == "names" else 2)
    if change != "dtype":
        assert (other.text_embeddings - first.text_embeddings).abs().max() > 1e-3


def test_random_weights_are_keyed_by_seed(cache, monkeypatch):
    build_predictor("clip", model="ovseg-tiny-vit", pretrained="random", seed=5, templates="single").set_classes(["cat"])
    encoded = _counting(monkeypatch)
    again = build_predictor("clip", model="ovseg-tiny-vit", pretrained="random", seed=5, templates="single")
    again.set_classes(["cat"])
    assert encoded == []


def test_weights_modified_in_place_are_not_served_from_the_cache(cache, monkeypatch):
    pred = build_predictor("clip", model="ovseg-tiny-vit", pretrained="random", templates="single")
    pred.set_classes(["cat"])
    before = pred.text_embeddings.clone()
    with torch.no_grad():
        pred.clip.text_projection.mul_(-1.0)
    encoded = _counting(monkeypatch)
    pred.set_classes(["cat"])
    assert encoded == ["cat"] and pred.text_key() is None
    torch.testing.assert_close(pred.text_embeddings, -before, atol=1e-6, rtol=0)
    assert len(list(cache.rglob("*.emb"))) == 1  # the modified weights' embedding was not stored


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other name", "not unit", "other width"])
def test_damaged_entry_is_recomputed_and_replaced(cache, monkeypatch, damage):
    build = lambda: build_predictor("clip", model="ovseg-tiny-vit", pretrained="random", templates="single")  # noqa: E731
    first = build()
    first.set_classes(["cat"])
    (entry,) = cache.rglob("*.emb")
    good = entry.read_bytes()
    emb = first.text_embeddings[0]
    entry.write_bytes({
        "garbage": b"\x00not an entry",
        "truncated": good[: len(good) - 9],
        "other name": text_cache.pack("dog", emb),
        "not unit": text_cache.pack("cat", 2 * emb),
        "other width": text_cache.pack("cat", F.normalize(torch.ones(8), dim=0)),
    }[damage])
    encoded = _counting(monkeypatch)
    second = build()
    second.set_classes(["cat"])
    assert encoded == ["cat"]
    torch.testing.assert_close(second.text_embeddings, first.text_embeddings, atol=0, rtol=0)
    assert entry.read_bytes() == good


def test_interrupted_write_leaves_no_entry_and_no_temporary_file(cache, monkeypatch):
    from pathlib import Path

    real_write = Path.write_bytes

    def failing_write(path, data):
        real_write(path, data[:5])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", failing_write)
    pred = build_predictor("clip", model="ovseg-tiny-vit", pretrained="random", templates="single")
    pred.set_classes(["cat"])  # a cache that cannot be written only warns
    assert pred.text_embeddings.shape == (1, 32)
    assert [p.name for p in cache.rglob("*") if p.is_file()] == ["meta.json"]


def test_cache_can_be_switched_off(cache, monkeypatch):
    monkeypatch.setenv(text_cache.ENV, "0")
    pred = build_predictor("clip", model="ovseg-tiny-vit", pretrained="random", templates="single")
    pred.set_classes(["cat"])
    assert not cache.exists()


def test_file_digest_is_remembered_and_follows_the_content(cache, tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"first weights")
    d1 = text_cache.file_digest(path)
    assert d1 == "sha256:" + __import__("hashlib").sha256(b"first weights").hexdigest()
    assert len(list((cache / "weights").glob("*.json"))) == 1
    path.write_bytes(b"other weights!")
    os.utime(path, ns=(1, 1))
    assert text_cache.file_digest(path) != d1
    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"x")
    (tmp_path / "link.safetensors").symlink_to(blob)
    assert text_cache.file_digest(tmp_path / "link.safetensors") == "sha256:" + "ab" * 32  # Hugging Face blob name


def test_cache_info_and_clear_commands(cache, capsys):
    pred = build_predictor("clip", model="ovseg-tiny-vit", pretrained="random", templates="single")
    pred.set_classes(["cat", "dog"])
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(cache) in out and "2 text embeddings of 1 encoders" in out and "ovseg-tiny-vit single float32" in out
    assert main(["cache", "clear"]) == 0
    assert "removed 2 text embeddings" in capsys.readouterr().out
    assert not cache.exists()
    assert main(["cache", "info"]) == 0
    assert "0 text embeddings" in capsys.readouterr().out


def test_bench_encodes_shared_class_names_once_and_a_rerun_encodes_nothing(cache, tmp_path, monkeypatch):
    from tests.test_bench import FAST, _suite, _write_dataset

    data = tmp_path / "data"
    _write_dataset(data / "first", 1, 0)
    _write_dataset(data / "second", 1, 1)
    suite = _suite(tmp_path / "mini.yaml", ["first", "second"])  # both: ["red, crimson", green, blue]
    encoded = _counting(monkeypatch)
    for run in ("run1", "run2"):
        args = ["bench", "--suite", str(suite), "--data-root", str(data), "--output", str(tmp_path / run), *FAST]
        assert main(args) == 0
    assert sorted(encoded) == ["blue", "crimson", "green", "red"]
