"""FLOSS (`floss` predictor): experts, fusion and template statistics against computations written here from
the formulas of the authors' code (yasserben/FLOSS ccf1d49: naclip.py, maskclip.py, dinoclip_inferencer.py,
entropy_metric.py), on a tiny random OpenAI-format CLIP loaded through `pretrained=PATH`. Each trap of the
method (where the softmax is, normalisation per host, skipping templates that never win, the most confident
owner, no renormalisation after the synonym max) has a check that a wrong implementation fails.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES as TEMPLATES

from ovseg import build_predictor
from ovseg.errors import ConfigError
from ovseg.pipeline.protocol import Protocol
from ovseg.pipeline.ranking import TemplateStatistics
from ovseg.pipeline.segmenter import resize_for
from ovseg.pipeline.vocabulary import Vocabulary
from ovseg.pipeline.windows import crop_windows, sliding_windows
from ovseg_floss import entropy_statistics, fuse_experts
from ovseg_floss.rankings import read_rankings, rankings_document, template_choice
from tests.test_clip_predictors import make_openai_state_dict

CLASSES = ["sky", "grass, lawn", "water"]  # 4 names, one class with a synonym
HOSTS = ["naclip", "maskclip"]


def _ranking(ids_pct: list[tuple[int, float]]) -> dict:
    return {"entropy_ranking": [{"template_id": t, "entropy": 0.1 * i, "pixel_percentage": p, "rank": i + 1}
                                for i, (t, p) in enumerate(ids_pct)]}


# sky's first two entries never won a pixel: the expert must skip them (templates 5, 9, 2, 7)
RANKINGS = {"model": "naclip", "dataset": "toy", "split": "train", "classes": {
    "sky": _ranking([(3, 0.0), (11, 0.0), (5, 2.0), (9, 1.0), (2, 4.0), (7, 3.0), (1, 1.0)]),
    "grass": _ranking([(40, 3.0), (41, 1.0), (42, 2.0), (43, 5.0), (44, 1.0)]),
    "water": _ranking([(60, 9.0), (61, 1.0), (62, 2.0), (63, 5.0)]),
}}
CHOSEN = [[5, 9, 2, 7], [40, 41, 42, 43], [40, 41, 42, 43], [60, 61, 62, 63]]  # per name; lawn inherits grass


def tiny_clip_state_dict() -> dict:
    """The tiny OpenAI-format CLIP of test_clip_predictors, with broad attention in the text tower (q and k
    rows scaled down) so that the class name, not only the template, reaches the end-of-text embedding:
    otherwise every name scores alike and class probabilities tie."""
    sd = make_openai_state_dict(seed=3)
    for key in [k for k in sd if k.startswith("transformer.") and k.endswith("attn.in_proj_weight")]:
        w = sd[key].float()
        w[: 2 * w.shape[1]] *= 0.1
        sd[key] = w.half()
    return sd


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("floss") / "tiny-openai.pt"
    torch.save(tiny_clip_state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def predictors(ckpt):
    out = {}
    for host in HOSTS:
        pred = build_predictor("floss", host=host, pretrained=ckpt, rankings=RANKINGS)
        pred.set_classes(CLASSES)
        out[host] = pred
    return out


def _blocks(h, w, b=2, seed=0):
    """Images of 16-pixel blocks of random colours (plus noise): patches that the classifiers tell apart."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(b, 3, (h + 15) // 16, (w + 15) // 16, generator=g)
    x = colours.repeat_interleave(16, 2).repeat_interleave(16, 3)[..., :h, :w]
    return (x + 0.1 * torch.rand(b, 3, h, w, generator=g)).clamp(0, 1)


def _images(h, w, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(b, 3, 1, 1, generator=g)
    ramp = torch.linspace(0, 1, w).view(1, 1, 1, w) * torch.rand(b, 3, 1, 1, generator=g)
    return (0.6 * base + 0.4 * ramp + 0.2 * torch.rand(b, 3, h, w, generator=g)).clamp(0, 1)


# ------------------------------------------------------------------------------------------------
# independent references, from the formulas


def ref_units(pred, prompts):
    """Unit text embedding of each prompt: the text tower's output, L2-normalised."""
    with torch.no_grad():
        return F.normalize(pred.host.clip.encode_text(pred.host.tokenizer(prompts)).float(), dim=-1)


def ref_classifiers(pred, names, chosen, renormalize):
    """(E + 1, Q, D): expert e over every name q = mean of the unit embeddings of e's templates applied to q
    (normalised again for NACLIP); the last row the 80-template default."""
    rows = []
    for ids in [*chosen, range(len(TEMPLATES))]:
        expert = torch.stack([ref_units(pred, [TEMPLATES[t](q) for t in ids]).mean(0) for q in names])
        rows.append(F.normalize(expert, dim=-1) if renormalize else expert)
    return torch.stack(rows)


def ref_fuse(probs: np.ndarray) -> np.ndarray:
    """Per pixel: owners are the experts whose argmax is their own name; the most confident owner's vector
    (strictly larger P_e[e] replaces, so the first wins ties), the default's without an owner."""
    experts, q, h, w = probs.shape[0] - 1, probs.shape[1], probs.shape[2], probs.shape[3]
    out = np.empty((q, h, w), probs.dtype)
    for y in range(h):
        for x in range(w):
            best = None
            for e in range(experts):
                if np.argmax(probs[e, :, y, x]) == e and (best is None or probs[e, e, y, x] > probs[best, best, y, x]):
                    best = e
            out[:, y, x] = probs[-1 if best is None else best, :, y, x]
    return out


def ref_statistics(pred, image, protocol, templates, host, renormalize_classes=False, softmax_after_merge=None):
    """Per template: class probabilities at the original size as the host's compute_metric mode, then per
    class the pixels it wins, their summed entropy and count (float64)."""
    vocab = pred.vocabulary
    softmax_after_merge = host == "naclip" if softmax_after_merge is None else softmax_after_merge
    resized = resize_for(image, protocol)
    x = resized.pixels.float() / 255
    height, width = x.shape[-2:]
    boxes = sliding_windows(height, width, protocol.crop or (height, width), protocol.stride)
    feats = pred.host.features(crop_windows(x, boxes))
    sums, counts = [], []
    for t in templates:
        text = ref_units(pred, [TEMPLATES[t](q) for q in vocab.names])
        cos = torch.einsum("nhwe,qe->nqhw", feats, text)
        if not softmax_after_merge:
            cos = torch.softmax(100 * cos, dim=1)
        canvas = torch.zeros(len(vocab.names), height, width)
        count = torch.zeros(1, height, width)
        for i, (y1, y2, x1, x2) in enumerate(boxes.tolist()):
            canvas[:, y1:y2, x1:x2] += F.interpolate(cos[i : i + 1], size=(y2 - y1, x2 - x1), mode="bilinear",
                                                     align_corners=False)[0]
            count[:, y1:y2, x1:x2] += 1
        p = F.interpolate((canvas / count)[None], size=resized.original_size, mode="bilinear", align_corners=False)[0]
        if softmax_after_merge:
            p = torch.softmax(100 * p, dim=0)
        classes = torch.stack([p[vocab.name_to_class == c].max(0).values for c in range(vocab.num_classes)])
        if renormalize_classes:
            classes = classes / classes.sum(0, keepdim=True)
        label = classes.argmax(0)
        entropy = -(classes * torch.log(classes + 1e-10)).sum(0)
        sums.append([entropy[label == c].double().sum().item() for c in range(vocab.num_classes)])
        counts.append([(label == c).sum().item() for c in range(vocab.num_classes)])
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# stage 2: experts and fusion


@pytest.mark.parametrize("host", HOSTS)
def test_expert_cosines_match_reference(predictors, host):
    pred = predictors[host]
    x = _images(40, 57)  # floor grid: 2 x 3 patches, the remainder dropped
    scores = pred.expert_scores(x)
    vocab = Vocabulary(CLASSES)
    assert scores.shape == (2, 5, 4, 2, 3) and scores.dtype == torch.float32
    ref = torch.einsum("bhwe,kqe->bkqhw", pred.host.features(x), ref_classifiers(pred, vocab.names, CHOSEN,
                                                                                      host == "naclip"))
    torch.testing.assert_close(scores, ref, atol=2e-5, rtol=0)
    # trap: expert normalisation per host; the other host's choice is measurably different
    wrong = torch.einsum("bhwe,kqe->bkqhw", pred.host.features(x), ref_classifiers(pred, vocab.names, CHOSEN,
                                                                                        host != "naclip"))
    assert (scores - wrong).abs().max() > 1e-3


def test_templates_that_never_won_are_skipped_before_top_n(predictors):
    pred = predictors["naclip"]
    vocab = Vocabulary(CLASSES)
    assert template_choice(read_rankings(RANKINGS), vocab, 80, 4) == CHOSEN
    # trap: keeping the never-winning templates (sky: 3, 11, 5, 9) gives another sky expert
    x = _images(32, 32, b=1)
    wrong = ref_classifiers(pred, vocab.names, [[3, 11, 5, 9], *CHOSEN[1:]], True)
    wrong_scores = torch.einsum("bhwe,kqe->bkqhw", pred.host.features(x), wrong)
    assert (pred.expert_scores(x)[:, 0] - wrong_scores[:, 0]).abs().max() > 1e-3


def test_top_n_larger_than_the_winners_and_classes_that_never_won():
    rankings = read_rankings({"classes": {
        "sky": _ranking([(3, 0.0), (8, 1.5)]),  # one winner: an expert of one template
        "grass": _ranking([(4, 0.0), (6, 0.0)]),  # never won: all templates (the default classifier)
        "water": _ranking([(1, 2.0), (2, 2.0), (0, 1.0)]),
    }})
    chosen = template_choice(rankings, Vocabulary(CLASSES), 80, top_n=10)
    assert chosen == [[8], list(range(80)), list(range(80)), [1, 2, 0]]


def test_fusion_matches_reference_with_conflicts_and_ties():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(5, 4, 6, 7, generator=g), dim=1)
    v = lambda *p: torch.tensor(p)  # noqa: E731
    # pixel (0, 0): experts 0 and 2 own it (1 and 3 do not), expert 2 is more confident -> expert 2's vector
    for e, p in enumerate([v(0.5, 0.2, 0.2, 0.1), v(0.7, 0.1, 0.1, 0.1), v(0.1, 0.1, 0.7, 0.1), v(0.9, 0, 0, 0.1)]):
        probs[e, :, 0, 0] = p
    # pixel (0, 1): experts 1 and 3 own it with equal confidence (0 and 2 do not) -> the lower index, 1
    for e, p in enumerate([v(0.1, 0.1, 0.1, 0.7), v(0.2, 0.6, 0.1, 0.1), v(0.7, 0.1, 0.1, 0.1), v(0.1, 0.1, 0.2, 0.6)]):
        probs[e, :, 0, 1] = p
    # pixel (0, 2): nobody owns it -> the default
    for e in range(4):
        probs[e, :, 0, 2] = torch.roll(v(0.7, 0.1, 0.1, 0.1), e + 1)
    fused = fuse_experts(probs, (6, 7))
    expected = torch.from_numpy(ref_fuse(probs.numpy()))
    torch.testing.assert_close(fused, expected, atol=0, rtol=0)
    assert torch.equal(fused[:, 0, 0], probs[2, :, 0, 0])  # not the first owner's (expert 0)
    assert torch.equal(fused[:, 0, 1], probs[1, :, 0, 1])
    assert torch.equal(fused[:, 0, 2], probs[4, :, 0, 2])
    # chunked over experts (one expert per chunk) gives exactly the same map
    assert torch.equal(fuse_experts(probs, (6, 7), max_elements=1), fused)


@pytest.mark.parametrize("host", HOSTS)
def test_forward_fuses_after_upsampling_to_the_window(predictors, host):
    pred = predictors[host]
    x = _blocks(45, 61, b=2, seed=4)
    out = pred(x)
    assert out.shape == (2, 4, 45, 61) and out.dtype == torch.float32
    for b in range(2):  # one image at a time, as forward computes it, so near-ties cannot flip
        probs = torch.softmax(100 * pred.expert_scores(x[b : b + 1])[0], dim=1)  # over names, at the patch grid
        up = F.interpolate(probs, size=(45, 61), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[b], torch.from_numpy(ref_fuse(up.numpy())), atol=1e-6, rtol=0)
        # trap: fusing at the patch grid and upsampling the fused map is not the same
        at_grid = torch.from_numpy(ref_fuse(probs.numpy()))
        wrong = F.interpolate(at_grid[None], size=(45, 61), mode="bilinear", align_corners=False)[0]
        assert (out[b] - wrong).abs().max() > 0.05


def test_chunked_fusion_in_the_predictor_is_exact(ckpt):
    small = build_predictor("floss", host="naclip", pretrained=ckpt, rankings=RANKINGS, max_elements=3000)
    big = build_predictor("floss", host="naclip", pretrained=ckpt, rankings=RANKINGS)
    for pred in (small, big):
        pred.set_classes(CLASSES)
    x = _images(32, 48, b=1, seed=5)
    assert torch.equal(small(x), big(x))


def test_text_embeddings_are_the_default_classifier(predictors):
    pred = predictors["maskclip"]
    vocab = Vocabulary(CLASSES)
    default = ref_classifiers(pred, vocab.names, [], True)[0]
    torch.testing.assert_close(pred.text_embeddings, default, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# rankings files: lookup, errors


def test_lookup_rules_authors_voc20_file():
    """The authors' NACLIP VOC20 file keys the dataset's names without spaces; ovseg's VOC20 prompts ship, table,
    person with synonyms and television monitor with synonyms (FLOSS naclip.py _apply_quick_and_dirty_fix)."""
    keys = ["aeroplane", "boat", "diningtable", "person", "pottedplant", "tvmonitor"]
    doc = {"classes": {k: _ranking([(i, 1.0), (i + 10, 1.0)]) for i, k in enumerate(keys)}}
    vocab = Vocabulary(["aeroplane", "ship", "table", "person, person in shirt", "potted plant",
                        "television monitor, tv monitor, screen"])
    aliases = {"ship": "boat", "table": "diningtable", "television monitor": "tvmonitor"}
    chosen = template_choice(read_rankings(doc), vocab, 80, 4, aliases)
    assert chosen == [[0, 10], [1, 11], [2, 12], [3, 13], [3, 13], [4, 14], [5, 15], [5, 15], [5, 15]]


def test_rankings_for_other_classes_name_the_missing_ones(predictors):
    pred = predictors["naclip"]
    with pytest.raises(ConfigError, match=r"no entry for 'water'.*ovseg rank-templates"):
        pred.configure(rankings={"classes": {k: v for k, v in RANKINGS["classes"].items() if k != "water"}})
    assert pred.rankings is RANKINGS  # refused: the predictor keeps its previous rankings and experts
    pred.expert_scores(_images(16, 16, b=1))


def test_bad_rankings_values(ckpt, tmp_path):
    with pytest.raises(ConfigError, match=r"predictor.rankings: rankings file .*nope.json' does not exist"):
        build_predictor("floss", host="naclip", pretrained=ckpt, rankings=str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read rankings file .* as JSON"):
        build_predictor("floss", host="naclip", pretrained=ckpt, rankings=str(bad))
    with pytest.raises(ConfigError, match="not a template rankings document"):
        build_predictor("floss", host="naclip", pretrained=ckpt, rankings={"sky": [1, 2]})
    with pytest.raises(ConfigError, match="uses template ids \\[95\\]"):
        pred = build_predictor("floss", host="naclip", pretrained=ckpt, rankings={"classes": {
            "sky": _ranking([(95, 1.0)]), "grass": _ranking([(1, 1.0)]), "water": _ranking([(1, 1.0)])}})
        pred.set_classes(CLASSES)
    with pytest.raises(ConfigError, match="gaussian_std is a NACLIP option"):
        build_predictor("floss", host="maskclip", pretrained=ckpt, gaussian_std=3.0)
    with pytest.raises(ConfigError, match="host must be one of naclip, maskclip"):
        build_predictor("floss", host="sclip", pretrained=ckpt)
    with pytest.raises(ConfigError, match="top_n must be at least 1"):
        build_predictor("floss", host="naclip", pretrained=ckpt, top_n=0)


def test_forward_without_rankings_says_how_to_get_them(ckpt):
    pred = build_predictor("floss", host="maskclip", pretrained=ckpt)
    pred.set_classes(CLASSES)
    with pytest.raises(ConfigError, match="predictor.rankings .*ovseg rank-templates"):
        pred(_images(16, 16, b=1))


# ------------------------------------------------------------------------------------------------
# stage 1: template statistics and the rankings document


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("crop", [32, None], ids=["windows", "whole"])
def test_template_statistics_match_reference(predictors, host, crop):
    pred = predictors[host]
    image = (255 * _blocks(37, 53, b=1, seed=7)[0]).round().to(torch.uint8)
    protocol = Protocol(short_side=48, crop=crop, stride=16)
    stats = pred.template_statistics(image, protocol, first=20, last=27)
    assert stats.first == 20 and stats.count.shape == (8, 3) and float(stats.pixels) == 37 * 53
    assert _agree(stats, *ref_statistics(pred, image, protocol, range(20, 28), host))
    # traps: renormalising after the synonym max, or the other host's softmax placement, change the statistics
    for wrong in (dict(renormalize_classes=True), dict(softmax_after_merge=host != "naclip")):
        assert not _agree(stats, *ref_statistics(pred, image, protocol, range(20, 28), host, **wrong))


def _agree(stats, sums, counts, ties=0.01):
    """Same statistics up to pixels at numerical ties between two classes (a tiny random CLIP has some): at
    most `ties` of the pixels change class, and each moved pixel moves at most log(3) of entropy."""
    moved = (stats.count - counts).abs()
    return bool(moved.sum() <= ties * counts.sum() and
                ((stats.entropy_sum - sums).abs() <= 2e-3 + 1.1 * moved).all())


def test_template_statistics_chunked_over_templates_agree(ckpt):
    image = (255 * _blocks(30, 41, b=1, seed=8)[0]).round().to(torch.uint8)
    protocol = Protocol(short_side=40, crop=32, stride=16)
    results = []
    for max_elements in (2**26, 4000):
        pred = build_predictor("floss", host="naclip", pretrained=ckpt, max_elements=max_elements)
        pred.set_classes(CLASSES)
        results.append(pred.template_statistics(image, protocol, 0, 9))
    assert torch.equal(results[0].count, results[1].count)
    torch.testing.assert_close(results[0].entropy_sum, results[1].entropy_sum, atol=1e-3, rtol=0)


def test_entropy_statistics_formula():
    probs = torch.tensor([[0.7, 0.2, 0.5, 0.1], [0.3, 0.8, 0.5, 0.9]]).view(1, 2, 2, 2)
    sums, counts = entropy_statistics(probs)
    ent = -(probs * torch.log(probs + 1e-10)).sum(1).flatten().double()
    # argmax: pixels 0 (0.7) and 2 (tie -> class 0) go to class 0; pixels 1 and 3 to class 1
    assert counts.tolist() == [[2.0, 2.0]]
    torch.testing.assert_close(sums, torch.stack([ent[[0, 2]].sum(), ent[[1, 3]].sum()]).view(1, 2), atol=2.5e-4,
                               rtol=0)
    assert float(sums[0, 0] / 2.0**-12) == round(float(sums[0, 0] / 2.0**-12))  # exact float64 sums across processes


def test_rankings_document_schema_sort_and_merge():
    stats = TemplateStatistics(
        entropy_sum=torch.tensor([[2.0, 0.0], [1.5, 0.9], [0.0, 0.3]], dtype=torch.float64),
        count=torch.tensor([[4.0, 0.0], [3.0, 3.0], [0.0, 1.0]], dtype=torch.float64),
        pixels=torch.tensor(20.0, dtype=torch.float64), first=0)
    doc = rankings_document(stats, ["sky", "road"], model="naclip", dataset="toy", split="train")
    assert {k: doc[k] for k in ("model", "dataset", "split")} == {"model": "naclip", "dataset": "toy", "split": "train"}
    sky = doc["classes"]["sky"]["entropy_ranking"]
    # template 2 never won sky: entropy 0, percentage 0, sorted first; templates 0 (2/4) and 1 (1.5/3) tie at 0.5
    assert [(e["template_id"], e["entropy"], e["pixel_percentage"], e["rank"]) for e in sky] == [
        (2, 0.0, 0.0, 1), (0, 0.5, 20.0, 2), (1, 0.5, 15.0, 3)]  # the tie keeps template order
    road = doc["classes"]["road"]["entropy_ranking"]
    assert [e["template_id"] for e in road] == [0, 1, 2] and road[1]["entropy"] == pytest.approx(0.3)
    # merged into a file that ranks other templates and another class: those are kept, these replaced
    previous = {"model": "naclip", "dataset": "toy", "split": "train", "classes": {
        "sky": {"entropy_ranking": [{"template_id": 7, "entropy": 0.4, "pixel_percentage": 1.0, "rank": 1},
                                    {"template_id": 1, "entropy": 9.0, "pixel_percentage": 1.0, "rank": 2}]},
        "car": {"entropy_ranking": [{"template_id": 0, "entropy": 1.0, "pixel_percentage": 1.0, "rank": 1}]}}}
    merged = rankings_document(stats, ["sky", "road"], model="naclip", dataset="toy", split="train",
                               previous=previous)
    assert merged["classes"]["car"] == previous["classes"]["car"]
    assert [(e["template_id"], e["rank"]) for e in merged["classes"]["sky"]["entropy_ranking"]] == [
        (2, 1), (7, 2), (1, 3), (0, 4)]  # 1 updated to 0.5 and kept before 0 (existing entries first on ties)
    json.dumps(merged)


def test_rank_templates_api_writes_rankings_the_predictor_reads(predictors):
    pred = predictors["maskclip"]
    images = [(255 * img).round().to(torch.uint8) for img in _blocks(30, 44, b=2, seed=9)]
    doc = pred.rank_templates(images, {"short_side": 40, "crop": 32, "stride": 16}, dataset="mine", split="unlabeled")
    assert doc["model"] == "maskclip" and doc["dataset"] == "mine" and list(doc["classes"]) == ["sky", "grass", "water"]
    assert all(len(c["entropy_ranking"]) == 80 for c in doc["classes"].values())
    shares = np.zeros(80)  # a template's pixel shares over the classes add up to 100 %
    for c in doc["classes"].values():
        for e in c["entropy_ranking"]:
            shares[e["template_id"]] += e["pixel_percentage"]
    np.testing.assert_allclose(shares, 100.0, atol=1e-9)
    assert pred.has_rankings(doc, "mine", pred.vocabulary) and not pred.has_rankings(doc, "other", pred.vocabulary)
    with pytest.raises(ConfigError, match="no images"):
        pred.rank_templates([], Protocol())
