"""Core contracts: vocabulary, window geometry and merging, protocol sizes, thresholds."""

import pytest
import torch
import torch.nn.functional as F

from ovseg.errors import ConfigError
from ovseg.pipeline.protocol import Protocol
from ovseg.pipeline.segmenter import apply_thresholds
from ovseg.pipeline.stages import VLMPredictor
from ovseg.pipeline.vocabulary import Vocabulary
from ovseg.pipeline.windows import merge_windows, sliding_windows


def test_vocabulary_synonyms_order_and_reduce():
    v = Vocabulary(["background, sky, wall", "cat", ["dog", "puppy"]])
    assert v.names == ["background", "sky", "wall", "cat", "dog", "puppy"]
    assert v.name_to_class.tolist() == [0, 0, 0, 1, 2, 2]
    scores = torch.tensor([[1.0, 5.0], [3.0, 0.0], [2.0, 1.0], [0.5, 0.5], [-1.0, 2.0], [4.0, -3.0]])
    out = v.reduce(scores)
    assert out.tolist() == [[3.0, 5.0], [0.5, 0.5], [4.0, 2.0]]
    # (Q, H, W) maps reduce the same way
    maps = torch.randn(6, 3, 4)
    expected = torch.stack([maps[0:3].amax(0), maps[3], maps[4:6].amax(0)])
    assert torch.equal(v.reduce(maps), expected)
    assert Vocabulary.parse("cow; grass; sky, clouds").names == ["cow", "grass", "sky", "clouds"]


@pytest.mark.parametrize(
    "classes, message",
    [([], "empty"), (["cat", ""], "empty name"), (["cat, ", "dog"], "empty name"),
     (["cat", "dog, cat"], "'cat' appears in class 0"), ("cat", "not a single string"), ([3], "string or a list")],
)
def test_vocabulary_errors(classes, message):
    with pytest.raises(ConfigError, match=message):
        Vocabulary(classes)


def _mmseg_windows(h, w, ch, cw, sh, sw):
    """Independent transcription of mmseg's slide_inference loop."""
    h_grids = max(h - ch + sh - 1, 0) // sh + 1
    w_grids = max(w - cw + sw - 1, 0) // sw + 1
    boxes = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * sh, wi * sw
            y2, x2 = min(y1 + ch, h), min(x1 + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            boxes.append([y1, y2, x1, x2])
    return boxes


@pytest.mark.parametrize("h, w, crop, stride", [(448, 597, 224, 112), (333, 517, 224, 112), (101, 57, 224, 112),
                                                 (225, 224, 224, 112), (300, 301, (128, 96), (64, 50)), (7, 9, 3, 2)])
def test_sliding_windows_geometry(h, w, crop, stride):
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    boxes = sliding_windows(h, w, crop, stride)
    assert boxes.dtype == torch.long
    assert boxes.tolist() == _mmseg_windows(h, w, ch, cw, sh, sw)
    assert int(boxes[:, 1].max()) == h and int(boxes[:, 3].max()) == w and int(boxes.min()) >= 0


def test_sliding_windows_counts_from_reference():
    assert len(sliding_windows(448, 597, 224, 112)) == 15
    assert len(sliding_windows(448, 896, 224, 112)) == 21
    assert sliding_windows(100, 150, 224, 112).tolist() == [[0, 100, 0, 150]]


def test_merge_windows_matches_naive_average():
    torch.manual_seed(0)
    h, w = 50, 70
    boxes = sliding_windows(h, w, 32, 20)
    scores = torch.randn(len(boxes), 3, 4, 4, dtype=torch.float64)
    canvas = torch.zeros(3, h, w, dtype=torch.float64)
    count = torch.zeros(h, w, dtype=torch.float64)
    for s, (y1, y2, x1, x2) in zip(scores, boxes.tolist()):
        canvas[:, y1:y2, x1:x2] += F.interpolate(s[None], size=(y2 - y1, x2 - x1), mode="bilinear",
                                                 align_corners=False)[0]
        count[y1:y2, x1:x2] += 1
    assert torch.allclose(merge_windows(scores, boxes, h, w), canvas / count)


def test_merge_windows_equals_one_batched_upsample_bit_for_bit():
    """The merge upsamples window by window; the values are those of one batched upsample, added in window order."""
    torch.manual_seed(2)
    h, w = 61, 90
    boxes = sliding_windows(h, w, 32, 20)
    scores = torch.randn(len(boxes), 5, 3, 3)
    up = F.interpolate(scores, size=(32, 32), mode="bilinear", align_corners=False)
    canvas = torch.zeros(5, h, w)
    count = torch.zeros(1, h, w)
    for u, (y1, y2, x1, x2) in zip(up, boxes.tolist()):
        canvas[:, y1:y2, x1:x2] += u
        count[:, y1:y2, x1:x2] += 1
    assert torch.equal(merge_windows(scores, boxes, h, w), canvas / count)


def test_protocol_resize_matches_mmcv_rescale():
    p = Protocol(short_side=448, long_side_max=2048)
    assert p.resized_size(512, 683) == (448, 598)
    assert p.resized_size(1024, 2048) == (448, 896)
    assert p.resized_size(100, 1000) == (205, 2048)  # long side capped
    assert Protocol(short_side=None).resized_size(37, 41) == (37, 41)


@pytest.mark.parametrize("values, message", [({"crop": 0}, "crop"), ({"prob_thd": 0.1}, "needs logit_scale"),
                                             ({"short_side": "big"}, "short_side"), ({"sizes": 3}, "unknown")])
def test_protocol_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        Protocol.from_dict(values)


def test_thresholds_follow_sclip():
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(4, 20, 30) * 3, 0)
    p = Protocol(logit_scale=40, prob_thd=0.5, area_thd=0.1)
    # SCLIP reference order: zero small foreground classes, argmax, then the probability threshold
    seg = probs.clone()
    onehot = F.one_hot(seg.argmax(0), 4).float()
    area = onehot[:, :, 1:].sum((0, 1))
    seg[1:] *= (area > 0.1 * area.sum()).float().view(-1, 1, 1)
    expected = seg.argmax(0)
    expected[seg.max(0).values < 0.5] = 0
    assert torch.equal(apply_thresholds(probs, p), expected)
    assert torch.equal(apply_thresholds(probs, Protocol()), probs.argmax(0))


def test_per_dataset_stage_options_apply_and_reset(tmp_path):
    from omegaconf import OmegaConf

    from ovseg.evaluation.methods import StageOptions
    from ovseg.pipeline.stages import Stage

    class Thresholded(Stage):
        options = ("thresh", "topk")

        def __init__(self):
            super().__init__()
            self.thresh, self.topk, self.calls = None, 5, []

        def configure(self, **options):
            self.calls.append(options)
            super().configure(**options)

        def check_options(self):
            if self.topk < 1:
                raise ConfigError(f"topk must be at least 1, got {self.topk}")

    cfg = OmegaConf.create({"name": "m", "datasets": {"voc21": {"predictor": {"thresh": 0.9}},
                                                      "ctx": {"predictor": {"topk": 3}}}})
    stage = Thresholded()
    options = StageOptions(cfg, {"predictor": stage})
    options.apply("voc21")
    assert (stage.thresh, stage.topk) == (0.9, 5)
    options.apply("ade20k")  # no override: back to the values the stage was built with
    assert (stage.thresh, stage.topk) == (None, 5)
    options.apply("ctx")
    assert (stage.thresh, stage.topk) == (None, 3)
    # a name the stage does not declare is refused when the method is loaded, naming only it
    bad = OmegaConf.create({"name": "m", "datasets": {"voc21": {"predictor": {"tresh": 0.9, "topk": 2}}}})
    with pytest.raises(ConfigError, match=r"unknown option 'tresh' \(did you mean 'thresh'\?\)") as info:
        StageOptions(bad, {"predictor": Thresholded()})
    assert "'topk'" not in str(info.value).split(";")[0]
    # a refused value leaves the stage as it was
    with pytest.raises(ConfigError, match="topk must be at least 1"):
        stage.configure(thresh=0.5, topk=0)
    assert (stage.thresh, stage.topk) == (None, 3)


# ---------------------------------------------------------------- names shared by two classes (COCO-Object 'bed')
NAME_RGB = {"sky": (120, 170, 255), "bed": (140, 90, 40), "red": (230, 20, 20)}


class NameColourPredictor(VLMPredictor):
    """Cosine between each 4x4 patch's mean colour and a fixed colour per name (centred at grey)."""

    patch_size = 4

    def set_classes(self, vocabulary):
        rgb = torch.tensor([NAME_RGB[n] for n in vocabulary.names], dtype=torch.float32) / 255
        self.text = F.normalize(rgb - 0.5, dim=1)

    def forward(self, images):
        mean = F.avg_pool2d(images, self.patch_size) - 0.5
        return torch.einsum("bchw,qc->bqhw", F.normalize(mean, dim=1), self.text)


def test_shared_name_keeps_both_queries_as_the_reference_class_files_do():
    v = Vocabulary(["sky, bed", "red", "bed"], shared_names=["bed"])
    assert v.names == ["sky", "bed", "red", "bed"] and v.name_to_class.tolist() == [0, 0, 1, 2]
    assert v.shared_names == ("bed",)

    from ovseg.pipeline.refiners import NoRefiner
    from ovseg.pipeline.segmenter import Segmenter

    image = torch.zeros(3, 16, 32)
    image[:, :, :16] = torch.tensor(NAME_RGB["red"]).view(3, 1, 1) / 255
    image[:, :, 16:] = torch.tensor(NAME_RGB["bed"]).view(3, 1, 1) / 255
    seg = Segmenter(NameColourPredictor(), NoRefiner(), protocol=Protocol(short_side=None, crop=None, logit_scale=50))
    result = seg.segment(image, v)
    # by hand, for a pixel deep inside the bed-coloured half: softmax over ALL four names, 'bed' twice
    colour = torch.tensor(NAME_RGB["bed"], dtype=torch.float32) / 255 - 0.5
    cos = torch.stack([F.cosine_similarity(colour, torch.tensor(NAME_RGB[n]) / 255 - 0.5, dim=0) for n in v.names])
    p = torch.softmax(50 * cos, 0)
    expected = torch.stack([torch.maximum(p[0], p[1]), p[2], p[3]])
    torch.testing.assert_close(result.scores[:, 8, 28], expected)
    assert p[1] < 0.5  # without the duplicate 'bed' alone would take most of the mass
    # the two 'bed' queries score the same, so the tie goes to the first class: background, never class 2
    assert torch.equal(result.scores[0, :, 16:], result.scores[2, :, 16:])
    assert (result.labels[:, 16:] == 0).all() and (result.labels[:, :16] == 1).all()


@pytest.mark.parametrize("classes, shared, message", [
    (["sky, bed", "bed"], [], r"'bed' appears in class 0 \('sky'\) and class 1 \('bed'\).*shared_names"),
    (["sky, bed", "cat"], ["bed"], r"shared_names \['bed'\] must each appear in at least two classes"),
    (["sky", "cat"], ["dog"], r"shared_names \['dog'\] must each appear"),
    (["sky, bed", "bed"], "bed", "shared_names must be a list of names"),
])
def test_shared_names_errors(classes, shared, message):
    with pytest.raises(ConfigError, match=message):
        Vocabulary(classes, shared)


def test_method_class_override_carries_its_own_shared_names(tmp_path):
    from omegaconf import OmegaConf

    from ovseg.evaluation.methods import dataset_vocabulary
    from ovseg.evaluation.suites import load_suite

    (tmp_path / "s.yaml").write_text(
        "datasets:\n  - name: obj\n    source: {type: demo}\n    shared_names: [bed]\n    classes: ['sky, bed', cat, bed]\n"
        "  - name: other\n    source: {type: demo}\n    classes: [sky, cat]\n"
    )
    obj, other = load_suite(tmp_path / "s.yaml").datasets
    assert obj.shared_names == ("bed",) and obj.vocabulary.names == ["sky", "bed", "cat", "bed"]

    def vocab(datasets, spec=obj):
        return dataset_vocabulary(OmegaConf.create({"name": "m", "datasets": datasets}), spec)

    assert vocab({}).names == ["sky", "bed", "cat", "bed"]  # the suite's classes and shared names
    assert vocab({"obj": {"classes": ["background", "cat", "bed"]}}).names == ["background", "cat", "bed"]
    with pytest.raises(ConfigError, match=r"method m, dataset obj: name 'bed' appears"):
        vocab({"obj": {"classes": ["sky, bed", "cat", "bed"]}})  # replaced classes do not inherit shared_names
    shared = vocab({"obj": {"classes": ["sky, bed", "cat", "bed"], "shared_names": ["bed"]}})
    assert shared.names == ["sky", "bed", "cat", "bed"]
    with pytest.raises(ConfigError, match=r"method m, dataset other: shared_names \['bed'\] must each appear"):
        vocab({"other": {"shared_names": ["bed"]}}, other)
