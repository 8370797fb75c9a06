"""Bench on miniature copies of real dataset layouts, through the shipped suite YAMLs.

The files are generated from each dataset's own suite entry (folders, suffixes, split file, label
conventions), so a suite entry that does not match the loader fails here.
"""

import json

import numpy as np
import pytest
from PIL import Image

from ovseg.cli.main import main
from ovseg.evaluation.suites import load_suite

from .test_bench import FAST


def _write_folder_copy(spec, data_root, n=2, seed=0, raw_labels=None):
    """Images and label PNGs where `spec.source` expects them; labels drawn from `raw_labels`."""
    src = spec.source
    root = data_root / src.root
    rng = np.random.default_rng(seed)
    raw_labels = raw_labels if raw_labels is not None else list(range(spec.num_classes))
    stems = [f"img{i:03d}" for i in range(n)]
    for i, stem in enumerate(stems):
        h, w = 40 + 7 * i, 56 + 5 * i  # by stem: tasks that share one image folder (PAXRay-4) agree on sizes
        label = np.array(raw_labels, dtype=np.uint8)[rng.integers(0, len(raw_labels), size=(h // 8, w // 8))]
        label = np.kron(label, np.ones((8, 8), np.uint8))[:h, :w]
        label = np.pad(label, ((0, h - label.shape[0]), (0, w - label.shape[1])), mode="edge")
        image = (np.random.default_rng(i).random((h, w, 3)) * 255).astype(np.uint8)
        for folder, suffix, array in ((src.images, src.image_suffix or ".png", image),
                                      (src.labels, src.label_suffix, label)):
            path = root / folder / f"{stem}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)
    if src.split_file:
        split = root / src.split_file
        split.parent.mkdir(parents=True, exist_ok=True)
        split.write_text("\n".join(stems) + "\n")


def _records(run):
    return {p.stem: json.loads(p.read_text()) for p in (run / "datasets").glob("*.json")}


@pytest.mark.slow
def test_mess22_layouts_group_and_domain_means(tmp_path):
    suite = load_suite("mess22")
    chosen = ["paxray_lungs", "paxray_mediastinum", "paxray_bones", "paxray_diaphragm", "deepcrack", "suim"]
    for i, name in enumerate(chosen):
        _write_folder_copy(suite[name], tmp_path / "data", seed=i)
    run = tmp_path / "run"
    args = ["bench", "--suite", "mess22", "--datasets", ",".join(chosen), "--data-root", str(tmp_path / "data"),
            "--output", str(run), *FAST, "protocol.short_side=64", "protocol.crop=48", "protocol.stride=32"]
    assert main(args) == 0
    rec = _records(run)
    assert {n for n, r in rec.items() if r["status"] == "done"} == set(chosen)
    paxray = np.mean([rec[n]["miou"] for n in chosen[:4]])
    summary = (run / "summary.md").read_text()
    # PAXRay-4 counts as one entry: the mean of its 4 binary tasks, as MESS does
    assert f"{100 * paxray:.2f}" in summary
    engineering = rec["deepcrack"]["miou"]
    assert f"{100 * engineering:.2f}" in summary
    # the suite mean is over the 3 finished entries (PAXRay-4, DeepCrack, SUIM) and says what is missing
    suite_mean = np.mean([paxray, rec["deepcrack"]["miou"], rec["suim"]["miou"]])
    assert f"{100 * suite_mean:.2f}" in summary
    assert "3 of 22" in summary


@pytest.mark.slow
def test_standard8_voc20_layout_reduces_zero_label(tmp_path):
    suite = load_suite("standard8")
    spec = suite["voc20"]
    # VOC labels as stored on disk: 0 background, 1..20 classes, 255 boundary
    _write_folder_copy(spec, tmp_path / "data", raw_labels=[0, 1, 5, 20, 255])
    dataset = spec.build(tmp_path / "data")
    sample = dataset[0]
    assert set(sample["label"].unique().tolist()) <= {0, 4, 19, 255}  # 0 and 255 ignored, k -> k - 1
    run = tmp_path / "run"
    assert main(["bench", "--suite", "standard8", "--datasets", "voc20", "--data-root", str(tmp_path / "data"),
                 "--output", str(run), *FAST, "protocol.short_side=64", "protocol.crop=48",
                 "protocol.stride=32"]) == 0
    rec = _records(run)["voc20"]
    assert rec["status"] == "done" and rec["num_images"] == 2
    # classes never present in ground truth nor predicted are NaN (null), not 0
    assert len(rec["per_class"]["iou"]) == 20


@pytest.mark.slow
def test_hugging_face_folder_suite(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8)) for _ in range(3)]
    masks = [Image.fromarray(rng.integers(0, 3, size=(40, 56)).astype(np.uint8)) for _ in range(3)]
    ds = datasets.Dataset.from_dict({"image": images, "annotation": masks},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "annotation": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "data" / "hfset"))
    suite = tmp_path / "hf.yaml"
    suite.write_text(
        "name: hfsuite\ndatasets:\n  - name: hfset\n    domain: General\n"
        "    source: {type: hf, path: hfset, image_column: image, label_column: annotation}\n"
        "    classes: [sky, grass, road]\n    protocol: {short_side: 64, crop: 48, stride: 32}\n")
    run = tmp_path / "run"
    assert main(["bench", "--suite", str(suite), "--data-root", str(tmp_path / "data"), "--output", str(run),
                 *FAST]) == 0
    rec = _records(run)["hfset"]
    assert rec["status"] == "done" and rec["num_images"] == 3
