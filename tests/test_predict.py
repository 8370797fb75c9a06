"""`ovseg predict`, the Python API and the pictures it writes.

Most tests use a tiny in-test predictor (mean patch colour against a fixed colour per class name),
registered by patching the registry, so that the outputs can be checked for meaning and the tests
do not depend on the model plugins; one test runs the tiny random models of configs/methods/tiny.yaml.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ovseg.registry as registry
from ovseg.cli.main import main
from ovseg.pipeline.stages import VLMPredictor

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "methods" / "tiny.yaml"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "navy": (20, 20, 120)}
CLASSES = "red; green; blue, navy"


class ColourPredictor(VLMPredictor):
    """Cosine between the mean colour of each 4x4 patch and a fixed colour per name (centred at grey)."""

    patch_size = 4
    built = 0

    def __init__(self):
        super().__init__()
        ColourPredictor.built += 1
        self.centre = torch.nn.Parameter(torch.full((3,), 0.5), requires_grad=False)
        self.register_buffer("text", torch.zeros(0, 3), persistent=False)

    def set_classes(self, vocabulary):
        names = vocabulary.names
        rgb = torch.tensor([COLOURS.get(n, (128, 128, 128)) for n in names], dtype=torch.float32) / 255
        self.text = F.normalize(rgb - 0.5, dim=1).to(self.centre)

    def forward(self, images):
        p = self.patch_size
        h, w = images.shape[-2:]
        x = F.pad(images.to(self.centre.dtype), (0, -w % p, 0, -h % p))  # each stage casts its own input
        mean = F.avg_pool2d(x, p) - self.centre.view(1, 3, 1, 1)
        return torch.einsum("bchw,qc->bqhw", F.normalize(mean, dim=1), self.text).float()


@pytest.fixture
def colour_method(tmp_path, monkeypatch):
    """A method YAML using the in-test predictor and the `none` refiner."""
    real = registry.load_plugin

    def load(kind, name):
        return ColourPredictor if (kind, name) == ("predictor", "testcolour") else real(kind, name)

    monkeypatch.setattr(registry, "load_plugin", load)
    ColourPredictor.built = 0
    path = tmp_path / "colour.yaml"
    path.write_text(
        "name: colour\npredictor: {name: testcolour}\nrefiner: {name: none}\n"
        "protocol: {short_side: 32, crop: 32, stride: 16}\n"
    )
    return path


def _bands(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """An image of three vertical bands (red, green, blue) and its true labels."""
    label = np.zeros((h, w), np.int64)
    label[:, w // 3 :] = 1
    label[:, 2 * w // 3 :] = 2
    palette = np.array([COLOURS["red"], COLOURS["green"], COLOURS["blue"]], np.uint8)
    return palette[label], label


def _predict(*argv) -> int:
    return main(["predict", *map(str, argv), "--accelerator", "cpu"])


def _check_outputs(out: Path, stem: str, size: tuple[int, int], num_classes: int, scores: bool) -> np.ndarray:
    h, w = size
    labels_img = Image.open(out / f"{stem}_labels.png")
    assert labels_img.mode == "P" and labels_img.size == (w, h)
    labels = np.array(labels_img)
    assert labels.min() >= 0 and labels.max() < num_classes
    ov = Image.open(out / f"{stem}_overlay.png")
    assert ov.mode == "RGB" and ov.width >= w and ov.height >= h and (ov.width, ov.height) != (w, h)
    if scores:
        s = np.load(out / f"{stem}_scores.npy")
        assert s.dtype == np.float32 and s.shape == (num_classes, h, w)
        assert np.array_equal(s.argmax(0), labels)
    else:
        assert not (out / f"{stem}_scores.npy").exists()
    return labels


def test_predict_writes_labels_overlay_and_scores(tmp_path, colour_method):
    folder = tmp_path / "imgs"
    folder.mkdir()
    sizes = {"a": (40, 60), "b": (57, 45)}
    truth = {}
    for stem, (h, w) in sizes.items():
        image, truth[stem] = _bands(h, w)
        Image.fromarray(image).save(folder / f"{stem}.png")
    (folder / "notes.txt").write_text("not an image, ignored in a folder")
    single, truth["c"] = _bands(33, 70)
    Image.fromarray(single).save(tmp_path / "c.bmp")
    out = tmp_path / "out"

    assert _predict(folder, tmp_path / "c.bmp", "--classes", CLASSES, "--method", colour_method,
                    "--output", out, "--save-scores") == 0
    assert ColourPredictor.built == 1  # one model for all images
    for stem, size in {**sizes, "c": (33, 70)}.items():
        labels = _check_outputs(out, stem, size, 3, scores=True)
        # the colour predictor finds the bands (borders blur with bilinear upsampling)
        assert (labels == truth[stem]).mean() > 0.8
    assert json.loads((out / "classes.json").read_text()) == {"0": ["red"], "1": ["green"], "2": ["blue", "navy"]}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["classes.json"] + [f"{s}_{k}" for s in "abc" for k in ("labels.png", "overlay.png", "scores.npy")]
    )


@pytest.mark.skipif(not TINY.exists(), reason="configs/methods/tiny.yaml (tiny random models) is not there yet")
def test_predict_with_tiny_random_models(tmp_path, capsys):
    image, _ = _bands(48, 64)
    Image.fromarray(image).save(tmp_path / "x.png")
    out = tmp_path / "out"
    assert _predict(tmp_path / "x.png", "--classes", "cow; grass; sky, clouds", "--method", TINY,
                    "--output", out, "--save-scores") == 0
    _check_outputs(out, "x", (48, 64), 3, scores=True)
    assert "random weights" in capsys.readouterr().out
    # the picture says so too: a red banner above the overlay
    top = np.asarray(Image.open(out / "x_overlay.png").convert("RGB"))[0]
    assert (top[:, 0] > 150).mean() > 0.5 and (top[:, 1] < 60).mean() > 0.5


def test_image_modes_are_converted_to_rgb(tmp_path, colour_method):
    image, truth = _bands(36, 48)
    rgb = Image.fromarray(image)
    grey16 = (np.asarray(rgb.convert("L"), np.uint16) * 257).astype(np.uint16)
    variants = {
        "grey": rgb.convert("L"),
        "rgba": rgb.convert("RGBA"),
        "palette": rgb.convert("P"),
        "la": rgb.convert("LA"),
        "cmyk": rgb.convert("CMYK"),
        "grey16": Image.fromarray(grey16),
        "bilevel": rgb.convert("1"),
    }
    for name, img in variants.items():
        img.save(tmp_path / (f"{name}.jpg" if name == "cmyk" else f"{name}.png"))
    out = tmp_path / "out"
    assert _predict(tmp_path, "--classes", CLASSES, "--method", colour_method, "--output", out) == 0
    for name in variants:
        _check_outputs(out, name, (36, 48), 3, scores=False)
    # colour survives RGBA, palette and CMYK conversion
    for name in ("rgba", "palette", "cmyk"):
        assert (np.array(Image.open(out / f"{name}_labels.png")) == truth).mean() > 0.8


def test_bad_inputs_are_reported_and_the_rest_processed(tmp_path, colour_method, capsys):
    image, _ = _bands(30, 40)
    Image.fromarray(image).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG")
    Image.fromarray(image).save(tmp_path / "cut.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "cut.jpg").read_bytes()[:200])
    (tmp_path / "empty").mkdir()
    Image.fromarray(image).save(tmp_path / "later.png")
    out = tmp_path / "out"

    code = _predict(tmp_path / "good.png", tmp_path / "missing.png", tmp_path / "broken.png", tmp_path / "cut.jpg",
                    tmp_path / "empty", tmp_path / "later.png", "--classes", CLASSES,
                    "--method", colour_method, "--output", out)
    err = capsys.readouterr().err
    assert code == 1
    assert "4 input(s) failed" in err
    for name, why in [("missing.png", "no such file"), ("broken.png", "not a readable image"),
                      ("cut.jpg", "not a readable image"), ("empty", "holds no images")]:
        assert any(name in line and why in line for line in err.splitlines()), (name, err)
    for stem in ("good", "later"):
        _check_outputs(out, stem, (30, 40), 3, scores=False)
    assert not list(out.glob("broken*")) and not list(out.glob("cut*"))


def test_only_missing_inputs_fail_without_building_the_model(tmp_path, colour_method, capsys):
    assert _predict(tmp_path / "nope.jpg", "--classes", CLASSES, "--method", colour_method,
                    "--output", tmp_path / "out") == 1
    assert "nope.jpg: no such file" in capsys.readouterr().err
    assert ColourPredictor.built == 0


@pytest.mark.parametrize(
    "classes, fragment",
    [(" ; ;", "class list is empty"), ("", "class list is empty"), ("cow; grass; cow", "'cow'"),
     ("cow; sky, cow", "'cow'"), ("cow;, grass", "empty name")],
)
def test_bad_class_lists_fail_before_any_work(tmp_path, colour_method, capsys, classes, fragment):
    image, _ = _bands(20, 20)
    Image.fromarray(image).save(tmp_path / "x.png")
    out = tmp_path / "out"
    assert _predict(tmp_path / "x.png", "--classes", classes, "--method", colour_method, "--output", out) == 2
    err = capsys.readouterr().err
    assert "--classes" in err and fragment in err
    assert ColourPredictor.built == 0 and not out.exists()


@pytest.mark.parametrize(
    "flags, fragment",
    [(["--precision", "fp8"], "--precision"), (["--accelerator", "tpu"], "--accelerator"),
     (["--method", "no_such_method"], "no_such_method"), (["refiner.nope=1"], "does not accept"),
     (["predictor.colors={red:[1,2,3]}"], "cannot apply overrides")],
)
def test_bad_options_are_config_errors(tmp_path, colour_method, capsys, flags, fragment):
    image, _ = _bands(20, 20)
    Image.fromarray(image).save(tmp_path / "x.png")
    overrides = [f for f in flags if "=" in f]  # overrides go right after the images
    flags = [f for f in flags if "=" not in f]
    argv = ["predict", str(tmp_path / "x.png"), *overrides, "--classes", CLASSES, "--output", str(tmp_path / "out")]
    if "--method" not in flags:
        argv += ["--method", str(colour_method)]
    if "--accelerator" not in flags:
        argv += ["--accelerator", "cpu"]
    assert main(argv + flags) == 2
    assert fragment in capsys.readouterr().err


def test_overrides_after_the_images_apply(tmp_path, colour_method, capsys):
    image, _ = _bands(40, 40)
    Image.fromarray(image).save(tmp_path / "x.png")
    assert _predict(tmp_path / "x.png", "protocol.short_side=16", "name=renamed", "--classes", CLASSES,
                    "--method", colour_method, "--output", tmp_path / "out") == 0
    _check_outputs(tmp_path / "out", "x", (40, 40), 3, scores=False)
    assert _predict(tmp_path / "x.png", "protocol.crop=-3", "--classes", CLASSES,
                    "--method", colour_method, "--output", tmp_path / "out") == 2
    assert "crop" in capsys.readouterr().err


def test_same_stem_in_two_folders_does_not_overwrite(tmp_path, colour_method):
    for folder, (h, w) in {"one": (20, 30), "two": (26, 22)}.items():
        (tmp_path / folder).mkdir()
        Image.fromarray(_bands(h, w)[0]).save(tmp_path / folder / "img.png")
    out = tmp_path / "out"
    assert _predict(tmp_path / "one", tmp_path / "two", "--classes", CLASSES, "--method", colour_method,
                    "--output", out) == 0
    _check_outputs(out, "img", (20, 30), 3, scores=False)
    _check_outputs(out, "two_img", (26, 22), 3, scores=False)


def test_bf16_true_casts_the_predictor(tmp_path, colour_method):
    from ovseg.api import load_segmenter

    seg = load_segmenter(colour_method, device="cpu", precision="bf16-true")
    assert seg.predictor.centre.dtype == torch.bfloat16
    image, truth = _bands(32, 48)
    result = seg.segment(image, CLASSES)
    assert result.scores.dtype == torch.float32 and (result.labels.numpy() == truth).mean() > 0.8
    Image.fromarray(image).save(tmp_path / "x.png")
    assert _predict(tmp_path / "x.png", "--classes", CLASSES, "--method", colour_method,
                    "--output", tmp_path / "out", "--precision", "bf16-true") == 0


def test_api_accepts_pil_numpy_tensor_and_paths(tmp_path, colour_method):
    from ovseg.api import load_segmenter

    seg = load_segmenter(colour_method, ["protocol.short_side=24"], device="cpu")
    assert seg.protocol.short_side == 24
    image, truth = _bands(30, 45)
    Image.fromarray(image).save(tmp_path / "x.png")
    results = [
        seg.segment(image, ["red", "green", "blue, navy"]),
        seg.segment(Image.fromarray(image), CLASSES),
        seg.segment(torch.from_numpy(image).permute(2, 0, 1), CLASSES),
        seg.segment(image.astype(np.float32) / 255, CLASSES),
        seg.segment(image.astype(np.uint16) * 257, CLASSES),  # 16-bit
        seg.segment(tmp_path / "x.png"),  # classes cached from the previous call
    ]
    for r in results:
        assert r.labels.shape == (30, 45) and r.scores.shape == (3, 30, 45)
        assert torch.equal(r.labels, results[0].labels)
    assert (results[0].labels.numpy() == truth).mean() > 0.8
    assert results[0].vocabulary.class_names == [["red"], ["green"], ["blue", "navy"]]


def test_api_rejects_what_it_cannot_read(colour_method):
    from ovseg.api import load_segmenter
    from ovseg.errors import ConfigError

    seg = load_segmenter(colour_method, device="cpu")
    with pytest.raises(ConfigError, match="shape"):
        seg.segment(np.zeros((2, 3, 4, 5), np.uint8), CLASSES)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        seg.segment(np.full((8, 8, 3), 7.0, np.float32), CLASSES)
    with pytest.raises(ConfigError, match="type"):
        seg.segment([[1, 2]], CLASSES)


# ---- pictures -----------------------------------------------------------------------------------


def test_palette_is_deterministic_and_distinct():
    from ovseg.visualize import palette

    big = palette(300)
    assert len({tuple(c) for c in big.tolist()}) == 300
    assert np.array_equal(palette(7), big[:7])


def test_label_png_keeps_class_indices(tmp_path):
    from ovseg.visualize import label_png, palette

    labels = np.arange(12).reshape(3, 4) % 5
    img = label_png(torch.from_numpy(labels))
    img.save(tmp_path / "l.png")
    back = Image.open(tmp_path / "l.png")
    assert back.mode == "P" and np.array_equal(np.array(back), labels)
    assert np.array_equal(np.array(back.convert("RGB"))[0, 1], palette(2)[1])
    wide = label_png(np.array([[0, 300]]))  # more classes than a palette holds: 16-bit indices
    assert np.array_equal(np.array(wide), [[0, 300]])


def test_overlay_legend_shows_only_present_classes():
    from ovseg.visualize import overlay, palette

    image = np.full((60, 90, 3), 128, np.uint8)
    labels = np.zeros((60, 90), np.int64)
    labels[:, 45:] = 3
    out = np.array(overlay(image, labels, ["zero", "one", "two", "three"], alpha=0.5))
    assert out.shape[0] >= 60 and out.shape[1] >= 90
    # the picture is untouched by the legend: blended colour inside each region
    expected = ((128 + palette(4)[[0, 3]].astype(int)) / 2 + 0.5).astype(np.uint8)
    assert np.array_equal(out[30, 10], expected[0]) and np.array_equal(out[30, 80], expected[1])
    legend = out[60:] if out.shape[0] > 60 else out[:, 90:]
    colours = {tuple(c) for c in legend.reshape(-1, 3).tolist()}
    present = {tuple(palette(4)[i].tolist()) for i in (0, 3)}
    absent = {tuple(palette(4)[i].tolist()) for i in (1, 2)}
    assert present <= colours and not (absent & colours)
