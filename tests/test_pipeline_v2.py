"""The v2 stage contract, checked on small in-test stages against independent computations.

Resize as mmcv does it (uint8, OpenCV), `set_image` before the windows, any output grid merged once by
the segmenter, refiner steps in their order (windows, merge, canvas, resize, output), option rollback,
and batch independence of the CLIP predictors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg.errors import ConfigError
from ovseg.pipeline.imaging import ResizedImage, resize_uint8, to_uint8
from ovseg.pipeline.protocol import Protocol
from ovseg.pipeline.refiners import NoRefiner
from ovseg.pipeline.segmenter import Segmenter, resize_for
from ovseg.pipeline.stages import FeatureExtractor, Refiner, Stage, VLMPredictor
from ovseg.pipeline.vocabulary import Vocabulary
from ovseg.pipeline.windows import sliding_windows

COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.2, 0.2, 0.9], [0.7, 0.2, 0.3]])


class MeanColourPredictor(VLMPredictor):
    """Scores = -distance of each patch's mean colour to a colour per name, on a chosen grid policy.

    Records what the segmenter hands it, so the tests can check the contract's calls.
    """

    def __init__(self, patch_size: int = 8, grid: str = "floor"):
        super().__init__()
        self.patch_size, self.grid = patch_size, grid
        self.calls: list[tuple] = []

    def set_classes(self, vocabulary):
        self.vocabulary = vocabulary if isinstance(vocabulary, Vocabulary) else Vocabulary(vocabulary)

    @property
    def text_embeddings(self):
        return COLOURS[: len(self.vocabulary.names)]  # one colour per name

    def set_image(self, image):
        self.calls.append(("image", tuple(image.shape), image.clone()))

    def forward(self, images):
        self.calls.append(("windows", tuple(images.shape)))
        p = self.patch_size
        if self.grid == "floor":
            images = images[..., : images.shape[-2] // p * p, : images.shape[-1] // p * p]
        mean = F.avg_pool2d(images, p)  # (B, 3, h, w)
        d = ((mean[:, None] - self.text_embeddings[None, :, :, None, None]) ** 2).sum(2)
        return -d


def _image(h=70, w=101, seed=0) -> torch.Tensor:
    """uint8 image of three vertical colour bands with noise."""
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(h, w, dtype=torch.long)
    label[:, w // 3 :] = 1
    label[:, 2 * w // 3 :] = 2
    img = COLOURS[label].permute(2, 0, 1) + 0.05 * torch.randn(3, h, w, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


# ---- one resize, as mmcv does it --------------------------------------------------------------------


def test_resize_is_opencv_on_uint8_at_mmcv_size():
    import cv2

    image = _image(333, 500)
    protocol = Protocol(short_side=336)
    resized = resize_for(image, protocol)
    assert resized.original_size == (333, 500)
    h, w = protocol.resized_size(333, 500)
    assert (h, w) == (336, int(500 * 336 / 333 + 0.5))  # mmcv rescale_size: round half up
    want = cv2.resize(image.permute(1, 2, 0).numpy(), (w, h), interpolation=cv2.INTER_LINEAR)
    assert resized.pixels.dtype == torch.uint8
    assert np.array_equal(resized.pixels.permute(1, 2, 0).numpy(), want)
    # what this replaces: a float bilinear resize in torch differs by up to about a grey level
    floaty = F.interpolate(image[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
    assert (floaty - resized.pixels.float()).abs().max() > 0.5


def test_float_images_are_quantised_to_8_bits_first():
    image = _image(40, 60)
    as_float = image.float() / 255
    assert torch.equal(to_uint8(as_float), image)
    assert torch.equal(resize_uint8(as_float, (20, 30)), resize_uint8(image, (20, 30)))
    assert torch.equal(to_uint8(torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1)).flatten(), torch.tensor([0, 128, 255], dtype=torch.uint8))


def test_segment_feeds_the_predictor_the_opencv_resized_image_and_restores_the_size():
    pred = MeanColourPredictor()
    protocol = Protocol(short_side=48, crop=32, stride=16)
    seg = Segmenter(pred, NoRefiner(), protocol=protocol)
    image = _image(70, 101)
    result = seg.segment(image, ["red", "green", "blue"])
    assert result.labels.shape == (70, 101)
    fed = [c for c in pred.calls if c[0] == "image"]
    assert len(fed) == 1  # set_image once per image
    resized = resize_for(image, protocol).pixels
    assert torch.equal(fed[0][2], resized.float() / 255)
    # the data path (a ResizedImage made in a worker) gives the same result as the API path
    again = seg.segment(resize_for(image, protocol))
    assert torch.equal(again.labels, result.labels) and torch.equal(again.scores, result.scores)
    with pytest.raises(ValueError, match="resized for another protocol"):
        seg.segment(ResizedImage(resized, (70, 140)))


def test_set_image_comes_before_the_windows():
    pred = MeanColourPredictor()
    seg = Segmenter(pred, NoRefiner(), protocol=Protocol(short_side=None, crop=32, stride=16))
    seg.segment(_image(64, 80), ["red", "green", "blue"])
    assert [c[0] for c in pred.calls] == ["image", "windows"]
    assert pred.calls[1][1][0] == len(sliding_windows(64, 80, 32, 16))  # all windows in one batch


# ---- any output grid, merged once by the segmenter ------------------------------------------------------


def _merge_by_hand(windows: torch.Tensor, boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    out = torch.zeros(windows.shape[1], h, w)
    count = torch.zeros(1, h, w)
    for win, (y1, y2, x1, x2) in zip(windows, boxes.tolist()):
        out[:, y1:y2, x1:x2] += F.interpolate(win[None], size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)[0]
        count[:, y1:y2, x1:x2] += 1
    return out / count


@pytest.mark.parametrize("grid", ["floor", "pixels"])
def test_window_maps_of_any_grid_are_stretched_over_their_boxes(grid):
    """Floor grid (the remainder dropped, the grid stretched over the whole window) and pixel maps alike."""
    pred = MeanColourPredictor(patch_size=8 if grid == "floor" else 1)
    protocol = Protocol(short_side=None, crop=(30, 37), stride=(15, 20), logit_scale=None)
    seg = Segmenter(pred, NoRefiner(), protocol=protocol)
    image = _image(60, 90)
    seg.set_classes(["red", "green", "blue"])
    got = seg.refined_scores(image.float() / 255)
    boxes = sliding_windows(60, 90, (30, 37), (15, 20))
    crops = torch.stack([image[:, y1:y2, x1:x2].float() / 255 for y1, y2, x1, x2 in boxes.tolist()])
    windows = pred(crops)
    assert windows.shape[-2:] == ((3, 4) if grid == "floor" else (30, 37))
    torch.testing.assert_close(got, _merge_by_hand(windows, boxes, 60, 90))


# ---- refiner steps -------------------------------------------------------------------------------------


class RecordingRefiner(Refiner):
    """Adds a distinct constant at each step and records the shapes it saw."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple] = []

    def refine_windows(self, image, boxes, scores, features):
        self.seen.append(("windows", tuple(scores.shape)))
        return scores + 1.0

    def refine_canvas(self, image, scores):
        self.seen.append(("canvas", tuple(scores.shape), tuple(image.shape)))
        return scores * 2.0

    def refine_output(self, image, scores):
        self.seen.append(("output", tuple(scores.shape), tuple(image.shape)))
        return scores - 3.0


@pytest.mark.parametrize("logit_scale", [None, 10.0])
def test_refiner_steps_run_in_order_around_the_merge_and_the_final_resize(logit_scale):
    pred = MeanColourPredictor()
    refiner = RecordingRefiner()
    protocol = Protocol(short_side=40, crop=24, stride=12, logit_scale=logit_scale)
    seg = Segmenter(pred, refiner, protocol=protocol)
    image = _image(50, 75)
    vocab = Vocabulary(["red, crimson", "green", "blue"])
    result = seg.segment(image, vocab)
    resized = resize_for(image, protocol).pixels.float() / 255
    h, w = resized.shape[-2:]
    boxes = sliding_windows(h, w, 24, 12)
    windows = pred(torch.stack([resized[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes.tolist()]))
    canvas = (_merge_by_hand(windows + 1.0, boxes, h, w)) * 2.0
    if logit_scale is None:  # LPOSS order: reduce, resize, output step, argmax
        expected = F.interpolate(vocab.reduce(canvas)[None], size=(50, 75), mode="bilinear", align_corners=False)[0] - 3.0
    else:  # SCLIP order: resize, output step, softmax over names, max per class
        up = F.interpolate(canvas[None], size=(50, 75), mode="bilinear", align_corners=False)[0] - 3.0
        expected = vocab.reduce(torch.softmax(up * logit_scale, 0))
    assert [s[0] for s in refiner.seen] == ["windows", "canvas", "output"]
    assert refiner.seen[1][1] == (4, h, w) and refiner.seen[2][2] == (3, h, w)
    torch.testing.assert_close(result.scores, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(result.labels, expected.argmax(0))


# ---- options: typed, rolled back, unknown names named alone --------------------------------------------


class Knobs(Stage):
    options = ("k", "alpha")

    def __init__(self):
        super().__init__()
        self.configure(k=3, alpha=0.5)

    def check_options(self):
        from ovseg.pipeline.options import integer, number

        self.k = integer(self.k, "k", self.stage_name, minimum=1)
        self.alpha = number(self.alpha, "alpha", self.stage_name, minimum=0.0, below=1.0)


@pytest.mark.parametrize("bad, message", [
    ({"k": 2.5}, "k must be an integer, got 2.5"),
    ({"k": True}, "k must be an integer, got True"),
    ({"k": 0}, "k must be at least 1, got 0"),
    ({"alpha": 1.0}, "alpha must be less than 1.0"),
    ({"k": 5, "alpha": "high"}, "alpha must be a finite number"),
    ({"kk": 3}, r"unknown option 'kk' \(did you mean 'k'\?\); its options are alpha, k"),
])
def test_configure_validates_types_and_rolls_back(bad, message):
    stage = Knobs()
    with pytest.raises(ConfigError, match=message):
        stage.configure(**bad)
    assert (stage.k, stage.alpha) == (3, 0.5)
    stage.configure(k=4.0)  # an integral float (YAML's 4e0) is an integer
    assert stage.k == 4 and isinstance(stage.k, int)


# ---- stages a predictor owns, batch independence ---------------------------------------------------------


class OwnsVisionModel(MeanColourPredictor):
    def __init__(self):
        super().__init__()
        self.vfm = RandomExtractor()


class RandomExtractor(FeatureExtractor):
    random_weights = True

    def forward(self, images):
        return images


def test_random_weights_of_a_model_a_predictor_owns_are_reported():
    seg = Segmenter(OwnsVisionModel(), NoRefiner())
    assert seg.random_weights
    assert not Segmenter(MeanColourPredictor(), NoRefiner()).random_weights


@pytest.mark.parametrize("method", ["sclip", "naclip", "clearclip", "maskclip"])
def test_clip_predictors_compute_each_window_of_a_batch_independently(method):
    from ovseg import build_predictor

    pred = build_predictor(method, model="ovseg-tiny-vit", pretrained="random", templates="single")
    pred.set_classes(["cat", "dog", "sky"])
    windows = torch.rand(3, 3, 48, 64, generator=torch.Generator().manual_seed(2))
    batched = pred(windows)
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], pred(windows[i : i + 1]), atol=1e-5, rtol=1e-5)


def test_extractor_raw_features_are_the_unnormalised_ones():
    from ovseg import build_extractor

    kw = dict(model="vit_tiny_patch16_224", pretrained="random", model_kwargs={"depth": 2}, feature="k")
    unit, raw = build_extractor("dino", **kw), build_extractor("dino", **kw, normalize=False)
    images = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(3))
    a, b = unit(images), raw(images)
    assert not torch.allclose(b.norm(dim=1), torch.ones(1))
    torch.testing.assert_close(F.normalize(b, dim=1), a, atol=1e-6, rtol=1e-6)
