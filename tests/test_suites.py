"""Suite loading (registered names and paths), schema errors, and the generated demo dataset."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import ovseg.evaluation.data.demo as demo
from ovseg.evaluation.data import DemoSource, FolderSource, check_dataset
from ovseg.errors import ConfigError, PluginError
from ovseg.evaluation.suites import DatasetSpec, Suite, load_suite


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OVSEG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------- the demo suite
def test_demo_suite_loads_and_builds(cache):
    suite = load_suite("demo")
    assert isinstance(suite, Suite) and suite.name == "demo" and suite.path.name == "demo.yaml"
    (spec,) = suite.datasets
    assert isinstance(spec, DatasetSpec) and isinstance(spec.source, DemoSource)
    assert [names[0] for names in spec.vocabulary.class_names] == list(demo.CLASSES)
    assert spec.ignore_index == 255 and not spec.reduce_zero_label and spec.protocol["crop"] == 224
    ds = spec.build()  # no data root needed
    assert len(ds) == demo.NUM_IMAGES == 20
    seen, ignored = set(), 0
    for i in range(len(ds)):
        s = ds[i]
        _, h, w = s["image"].shape
        assert 160 <= h <= 240 and 224 <= w <= 320 and s["label"].shape == (h, w)
        seen |= set(s["label"].unique().tolist())
        ignored += int((s["label"] == 255).any())
    assert seen == {0, 1, 2, 3, 4, 255} and ignored >= 1
    assert check_dataset(spec, None).status == "found"


def test_demo_classes_have_distinct_colours(cache):
    """Colour helps: the per-class mean colours are far apart relative to the within-class spread."""
    ds = load_suite("demo").datasets[0].build()
    s = ds[3]
    img, lab = s["image"].float(), s["label"]
    means = torch.stack([img[:, lab == c].mean(1) for c in range(5)])
    dist = torch.cdist(means, means) + torch.eye(5) * 1e3
    assert dist.min() > 30


def test_demo_generation_is_deterministic(tmp_path):
    a, b = demo.generate_demo(tmp_path / "a"), demo.generate_demo(tmp_path / "b")
    da = digest(a)
    assert len(da) == 2 * demo.NUM_IMAGES and da == digest(b)


def test_demo_is_generated_once_and_regenerated_on_version_change(cache, monkeypatch):
    root = demo.ensure_demo()
    assert root == cache / "demo" and (root / demo.MARKER).read_text().strip() == str(demo.GENERATOR_VERSION)
    first = digest(root)
    (root / "images" / "demo_000.png").write_bytes(b"edited")  # a current marker means: not regenerated
    assert demo.ensure_demo() == root and (root / "images" / "demo_000.png").read_bytes() == b"edited"
    monkeypatch.setattr(demo, "GENERATOR_VERSION", demo.GENERATOR_VERSION + 1)
    demo.ensure_demo()
    assert (root / demo.MARKER).read_text().strip() == str(demo.GENERATOR_VERSION)
    assert (root / "images" / "demo_000.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folders left
    assert set(digest(root)) == set(first)


def test_demo_concurrent_generation_is_safe(cache):
    with ThreadPoolExecutor(3) as pool:
        roots = list(pool.map(lambda _: demo.ensure_demo(), range(3)))
    assert len(set(roots)) == 1
    assert len(digest(roots[0])) == 2 * demo.NUM_IMAGES + 1  # images, labels and the marker
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- loading and schema
def test_registered_suites_load():
    for name in ("standard8", "mess22"):
        suite = load_suite(name)
        assert suite.name == name and suite.datasets
        assert all(isinstance(d.source, FolderSource) for d in suite.datasets)
    assert {d.group for d in load_suite("mess22").datasets} >= {"paxray4"}


def test_unknown_suite_name_lists_registered():
    with pytest.raises(PluginError, match=r"unknown suite 'nosuch'.*demo"):
        load_suite("nosuch")
    with pytest.raises(ConfigError, match=r"suite file .*nosuch\.yaml does not exist"):
        load_suite("nosuch.yaml")


ENTRY = """  - name: mini
    source: {type: folder, root: data/mini, images: img, labels: ann}
    classes: ["red, crimson", green]
"""


def test_load_by_path_with_classes_file(tmp_path):
    (tmp_path / "cls").mkdir()
    write(tmp_path / "cls" / "mini.txt", "red, crimson\n\ngreen\n")
    path = write(tmp_path / "mine.yaml", """datasets:
  - name: mini
    title: Mini
    domain: Medical Sciences
    group: g
    source: {type: hf, path: some/id, split: test, label_column: mask}
    classes_file: cls/mini.txt
    ignore_index: 0
    reduce_zero_label: true
    label_map: {"3": 1, 4: 255}
    protocol: {short_side: 64, crop: [32, 48], stride: 16}
""")
    suite = load_suite(str(path))
    assert suite.name == "mine" and suite.description == "" and suite.path == path
    (spec,) = suite.datasets
    assert spec.classes == ["red, crimson", "green"] and spec.num_classes == 2
    assert (spec.title, spec.domain, spec.group, spec.ignore_index, spec.reduce_zero_label) == (
        "Mini", "Medical Sciences", "g", 0, True)
    assert spec.label_map == {3: 1, 4: 255}
    assert spec.source.path == "some/id" and spec.source.label_column == "mask" and spec.source.image_column == "image"
    assert spec.protocol == {"short_side": 64, "crop": [32, 48], "stride": 16}
    assert spec.resolved_protocol().crop == [32, 48]
    assert suite["mini"] is spec


@pytest.mark.parametrize("text, message", [
    ("name: x\nwidgets: 1\ndatasets:\n" + ENTRY, r"unknown key\(s\) \['widgets'\]"),
    ("datasets:\n" + ENTRY + "    colour: red\n", r"dataset mini: unknown key\(s\) \['colour'\]"),
    ("datasets:\n" + ENTRY.replace("labels: ann", "labels: ann, shuffle: true"),
     r"dataset mini: unknown key\(s\) \['shuffle'\] in the folder source"),
    ("datasets:\n  - name: mini\n    classes: [a]\n", r"dataset mini: missing `source`"),
    ("datasets:\n  - source: {type: demo}\n    classes: [a]\n", r"datasets\[0\] needs a `name`"),
    ("datasets:\n  - name: mini\n    source: {type: demo}\n", r"dataset mini: give exactly one of `classes` and `classes_file`"),
    ("datasets:\n" + ENTRY + "    classes_file: x.txt\n", r"dataset mini: give exactly one"),
    ("datasets:\n" + ENTRY + "    protocol: {crop: 0}\n", r"dataset mini: protocol.crop must be at least 1, got 0"),
    ("datasets:\n" + ENTRY + "    protocol: {window: 3}\n", r"dataset mini: protocol: unknown option .window. \(did you mean .window_batch.\?\)"),
    ("datasets:\n" + ENTRY + "    ignore_index: none\n", r"dataset mini: `ignore_index` must be int"),
    ("datasets:\n" + ENTRY + "    label_map: {a: 1}\n", r"dataset mini: `label_map` keys and values must be integers"),
    ("datasets:\n" + ENTRY + ENTRY, r"dataset name 'mini' appears twice"),
    ("datasets:\n  - name: mini\n    source: {type: demo}\n    classes: [a, 'b, a']\n", r"dataset mini: name 'a' appears"),
    ("datasets:\n" + ENTRY + "    shared_names: green\n", r"dataset mini: `shared_names` must be a list"),
    ("datasets:\n" + ENTRY + "    shared_names: [red]\n", r"dataset mini: shared_names \['red'\] must each appear"),
    ("datasets:\n  - name: mini\n    source: {type: demo}\n    classes_file: none.txt\n", r"dataset mini: cannot read classes_file"),
    ("datasets: []\n", r"`datasets` must be a non-empty list"),
    ("datasets: [\n", r"cannot read the suite"),
])
def test_schema_errors_name_file_and_dataset(tmp_path, text, message):
    path = write(tmp_path / "bad_suite.yaml", text)
    with pytest.raises(ConfigError, match=message) as info:
        load_suite(path)
    assert str(path) in str(info.value)


def test_data_root_resolution(tmp_path):
    root = tmp_path / "data" / "mini"
    for sub in ("img", "ann"):
        (root / sub).mkdir(parents=True)
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "img" / "a.png")
    Image.fromarray(np.ones((4, 4), np.uint8)).save(root / "ann" / "a.png")
    spec = load_suite(write(tmp_path / "s.yaml", "datasets:\n" + ENTRY)).datasets[0]
    assert len(spec.build(tmp_path)) == 1  # relative to the data root
    absolute = ENTRY.replace("root: data/mini", f"root: {root}")
    spec = load_suite(write(tmp_path / "t.yaml", "datasets:\n" + absolute)).datasets[0]
    assert spec.build(tmp_path / "elsewhere")[0]["label"].unique().tolist() == [1]  # absolute root wins
