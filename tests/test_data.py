"""Dataset sources on miniature layouts generated here: samples, label conventions, every error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg.evaluation.data import (
    DatasetStatus,
    FolderDataset,
    HFDataset,
    LabelConventions,
    MissingDataError,
    check_dataset,
)
from ovseg.errors import ConfigError, DatasetError
from ovseg.evaluation.suites import parse_suite


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def bands(h, w, values):
    """A label with vertical bands of `values`."""
    label = np.zeros((h, w), np.uint8)
    for i, v in enumerate(values):
        label[:, i * w // len(values):] = v
    return label


def save(array_or_img, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = array_or_img if isinstance(array_or_img, Image.Image) else Image.fromarray(array_or_img)
    img.save(path, **kw)
    return path


def palette_label(label: np.ndarray) -> Image.Image:
    img = Image.fromarray(label, "P")
    pal = np.random.default_rng(1).integers(0, 256, 768).astype(np.uint8)  # colours unrelated to indices
    img.putpalette(pal.tolist())
    return img


# ---------------------------------------------------------------- layouts
@pytest.fixture
def voc(tmp_path):
    """mmseg VOC-like: JPEGImages/*.jpg, SegmentationClass/*_gt.png (palette), a split file."""
    root = tmp_path / "VOC"
    stems = ["b_002", "a_001", "c_003"]
    for i, stem in enumerate(stems):
        save(rgb(20 + i, 30, i), root / "JPEGImages" / f"{stem}.jpg")
        save(palette_label(bands(20 + i, 30, [0, i + 1, 255])), root / "SegmentationClass" / f"{stem}_gt.png")
    save(rgb(10, 10), root / "JPEGImages" / "train_only.jpg")  # not in the split, no label: ignored
    (root / "ImageSets").mkdir()
    (root / "ImageSets" / "val.txt").write_text("b_002\na_001\n\nc_003\n")
    return root


def voc_dataset(root, **kw):
    kw.setdefault("conventions", LabelConventions(4))
    return FolderDataset(root, "JPEGImages", "SegmentationClass", ".jpg", "_gt.png", "ImageSets/val.txt", **kw)


def test_folder_with_split_file_and_suffixes(voc):
    ds = voc_dataset(voc)
    assert len(ds) == 3
    assert [ds[i]["name"] for i in range(3)] == ["b_002", "a_001", "c_003"]  # split-file order
    s = ds[1]
    assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, 21, 30)
    assert s["label"].dtype == torch.int64 and s["label"].shape == (21, 30)
    # palette PNG read as indices, not colours
    assert s["label"].unique().tolist() == [0, 2, 255]
    assert s["path"].endswith("a_001.jpg")


def test_cityscapes_like_recursive_layout(tmp_path):
    root = tmp_path / "cityscapes"
    cities = {"aachen": ["aachen_000000_000019", "aachen_000001_000019"], "bonn": ["bonn_000000_000019"]}
    for k, (city, stems) in enumerate(cities.items()):
        for j, stem in enumerate(stems):
            save(rgb(8, 16, k), root / "leftImg8bit/val" / city / f"{stem}_leftImg8bit.png")
            gt = root / "gtFine/val" / city
            save(np.full((8, 16), 10 * k + j, np.uint8), gt / f"{stem}_gtFine_labelTrainIds.png")
            save(np.full((8, 16), 200, np.uint8), gt / f"{stem}_gtFine_labelIds.png")  # distractors
            save(rgb(8, 16), gt / f"{stem}_gtFine_color.png")
    ds = FolderDataset(root, "leftImg8bit/val", "gtFine/val", "_leftImg8bit.png", "_gtFine_labelTrainIds.png",
                       conventions=LabelConventions(19))
    got = {ds[i]["name"]: ds[i]["label"].unique().tolist() for i in range(len(ds))}
    assert got == {"aachen_000000_000019": [0], "aachen_000001_000019": [1], "bonn_000000_000019": [10]}


def test_flat_labels_for_nested_images_pair_by_stem(tmp_path):
    save(rgb(6, 6), tmp_path / "d/images/sub/x.jpg")
    save(np.ones((6, 6), np.uint8), tmp_path / "d/labels/x.png")
    ds = FolderDataset(tmp_path / "d", conventions=LabelConventions(2))
    assert len(ds) == 1 and ds[0]["label"].unique().tolist() == [1]


def test_image_modes_become_rgb(tmp_path):
    root = tmp_path / "modes"
    g = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    save(Image.fromarray(g, "L"), root / "images/gray.png")
    save(Image.fromarray(np.dstack([rgb(6, 8), np.full((6, 8), 7, np.uint8)]), "RGBA"), root / "images/rgba.png")
    save(palette_label(g), root / "images/pal.png")
    save(Image.fromarray((g.astype(np.uint16) * 257)), root / "images/deep.png")  # 16-bit grayscale
    for stem in ("gray", "rgba", "pal", "deep"):
        save(np.zeros((6, 8), np.uint8), root / f"labels/{stem}.png")
    ds = FolderDataset(root, conventions=LabelConventions(1))
    out = {ds[i]["name"]: ds[i]["image"] for i in range(len(ds))}
    for name, img in out.items():
        assert img.shape == (3, 6, 8) and img.dtype == torch.uint8, name
    assert torch.equal(out["gray"][0], torch.from_numpy(g)) and torch.equal(out["gray"][0], out["gray"][2])
    assert torch.equal(out["deep"], out["gray"])  # 16-bit v*257 -> v
    assert torch.equal(out["rgba"], torch.from_numpy(rgb(6, 8)).permute(2, 0, 1))


# ---------------------------------------------------------------- label conventions
def test_reduce_zero_label_is_mmseg():
    raw = np.array([[0, 1, 2], [150, 254, 255]], np.uint8)
    out = LabelConventions(254, reduce_zero_label=True).convert(raw, "f.png")
    # mmseg: label[label==0]=255; label-=1; label[label==254]=255
    ref = raw.copy()
    ref[ref == 0] = 255
    ref = ref - 1
    ref[ref == 254] = 255
    assert out.tolist() == ref.astype(np.int64).tolist() == [[255, 0, 1], [149, 253, 255]]


def test_label_map_applies_before_reduce_zero_label():
    conv = LabelConventions(3, reduce_zero_label=True, label_map={7: 1, 9: 0, 4: 255})
    raw = np.array([0, 1, 2, 3, 7, 9, 4, 255], np.uint8)
    assert conv.convert(raw, "f.png").tolist() == [255, 0, 1, 2, 0, 255, 255, 255]
    conv = LabelConventions(5, label_map={0: 255, 3: 4})
    assert conv.convert(np.array([0, 1, 3, 255]), "f.png").tolist() == [255, 1, 4, 255]


def test_wide_label_values():
    conv = LabelConventions(3, label_map={40000: 2, 70000: 1})
    assert conv.convert(np.array([0, 40000], np.uint16), "f.png").tolist() == [0, 2]
    assert conv.convert(np.array([1, 70000], np.int32), "f.png").tolist() == [1, 1]  # beyond the table


def test_out_of_range_labels_name_file_and_values():
    conv = LabelConventions(3, reduce_zero_label=True)
    with pytest.raises(DatasetError, match=r"lab\.png: label values 3, 9 .*\[0, 3\).*raw values in the file: 4, 10"):
        conv.convert(np.array([0, 1, 4, 10, 255], np.uint8), "lab.png")
    with pytest.raises(DatasetError, match=r"-1"):
        LabelConventions(3).convert(np.array([-1, 0], np.int32), "lab.png")


def test_conventions_through_a_folder_dataset(voc):
    ds = voc_dataset(voc, conventions=LabelConventions(3, reduce_zero_label=True, label_map={3: 1}))
    # raw bands [0, i+1, 255] in split order b (1), a (2), c (3): label_map 3->1, then reduce 0->255, k->k-1
    assert [ds[i]["label"].unique().tolist() for i in range(3)] == [[0, 255], [1, 255], [0, 255]]


# ---------------------------------------------------------------- Hugging Face sources
@pytest.fixture
def hf_data(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    images = [Image.fromarray(rgb(5 + i, 7, i)) for i in range(3)]
    masks = [palette_label(bands(5 + i, 7, [0, 2])) for i in range(3)]
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image(), "id": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": images, "annotation": masks, "id": ["x0", "x1", "x2"]}, features=features)
    return datasets, ds


def _check_hf_samples(ds: HFDataset, names=("x0", "x1", "x2")):
    assert len(ds) == 3
    for i, name in enumerate(names):
        s = ds[i]
        assert s["name"] == name
        assert s["image"].shape == (3, 5 + i, 7) and torch.equal(s["image"], torch.from_numpy(rgb(5 + i, 7, i)).permute(2, 0, 1))
        assert s["label"].unique().tolist() == [0, 2]  # palette indices


def test_hf_save_to_disk(hf_data, tmp_path):
    datasets, ds = hf_data
    datasets.DatasetDict({"validation": ds, "train": ds.select([0])}).save_to_disk(tmp_path / "saved")
    hd = HFDataset("saved", "validation", "image", "annotation", "id", data_root=tmp_path, conventions=LabelConventions(3))
    _check_hf_samples(hd)
    with pytest.raises(DatasetError, match=r"saved.*choose a split.*train, validation"):
        HFDataset(str(tmp_path / "saved"), None, "image", "annotation")
    with pytest.raises(DatasetError, match=r"no column 'mask'.*annotation"):
        HFDataset(str(tmp_path / "saved"), "validation", "image", "mask")
    ds.save_to_disk(tmp_path / "single")  # a plain Dataset: no split to choose
    assert len(HFDataset(str(tmp_path / "single"), None, "image", "annotation", conventions=LabelConventions(3))) == 3


def test_hf_parquet_file_and_folder(hf_data, tmp_path):
    _, ds = hf_data
    ds.to_parquet(str(tmp_path / "val.parquet"))
    _check_hf_samples(HFDataset(str(tmp_path / "val.parquet"), None, "image", "annotation", "id",
                                conventions=LabelConventions(3)))
    (tmp_path / "pq" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "pq" / "data" / "validation-00000-of-00001.parquet"))
    hd = HFDataset(str(tmp_path / "pq"), "validation", "image", "annotation", conventions=LabelConventions(3))
    _check_hf_samples(hd, names=("000000", "000001", "000002"))


def test_hf_label_out_of_range_names_row(hf_data, tmp_path):
    _, ds = hf_data
    ds.save_to_disk(tmp_path / "single")
    hd = HFDataset(str(tmp_path / "single"), None, "image", "annotation", conventions=LabelConventions(2))
    with pytest.raises(DatasetError, match=r"single row 1 column 'annotation'.*label values 2"):
        hd[1]


def test_hf_hub_id_goes_to_load_dataset_with_config_split_and_revision(hf_data, monkeypatch, tmp_path):
    datasets, ds = hf_data
    calls = []

    def fake_load_dataset(path, **kwargs):  # stands in for the download; everything around it is real
        calls.append((path, kwargs))
        return ds if kwargs["split"] else datasets.DatasetDict({"validation": ds})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hd = HFDataset("someone/tiny-seg", "validation", "image", "annotation", "id", config="full", revision="v1.0",
                   data_root=tmp_path, conventions=LabelConventions(3))
    assert calls == [("someone/tiny-seg", {"name": "full", "split": "validation", "revision": "v1.0"})]
    assert hd.where == "hub dataset 'someone/tiny-seg'"
    _check_hf_samples(hd)
    # no split asked for: a DatasetDict with one split is used as that split
    hd = HFDataset("someone/tiny-seg", None, "image", "annotation", conventions=LabelConventions(3))
    assert hd.split == "validation" and len(hd) == 3
    with pytest.raises(DatasetError, match=r"hub dataset 'someone/tiny-seg' split validation: no column 'mask'"):
        HFDataset("someone/tiny-seg", "validation", "image", "mask")


def test_hf_hub_id_unreachable_is_missing_data_naming_the_id(tmp_path):
    # a real `datasets.load_dataset` call in offline mode (this machine has no hub access either way)
    script = (
        "from ovseg.evaluation.data import HFDataset, MissingDataError\n"
        "try:\n    HFDataset('someone/not-cached-anywhere', 'validation')\n"
        "except MissingDataError as exc:\n    print(exc)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "ds")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("hub dataset 'someone/not-cached-anywhere': could not be loaded with `datasets`")


def test_hf_missing_local_path(tmp_path):
    with pytest.raises(MissingDataError, match="nothere.parquet"):
        HFDataset(str(tmp_path / "nothere.parquet"))


# ---------------------------------------------------------------- errors name the file
def test_missing_folders(tmp_path):
    with pytest.raises(MissingDataError, match=r"dataset folder .*nope does not exist"):
        FolderDataset(tmp_path / "nope")
    (tmp_path / "d" / "images").mkdir(parents=True)
    with pytest.raises(MissingDataError, match=r"label folder .*d/labels does not exist"):
        FolderDataset(tmp_path / "d")


def test_no_images_found(tmp_path):
    (tmp_path / "d/images").mkdir(parents=True)
    (tmp_path / "d/labels").mkdir()
    save(rgb(4, 4), tmp_path / "d/images/a.png")
    with pytest.raises(DatasetError, match=r"no \*\.jpg found under .*d/images"):
        FolderDataset(tmp_path / "d", image_suffix=".jpg")


def test_image_without_label(tmp_path):
    save(rgb(4, 4), tmp_path / "d/images/a.jpg")
    save(rgb(4, 4), tmp_path / "d/images/b.jpg")
    save(np.zeros((4, 4), np.uint8), tmp_path / "d/labels/a.png")
    with pytest.raises(DatasetError, match=r"images/b\.jpg: image without a label \(expected .*labels/b\.png\).*missing_labels: skip"):
        FolderDataset(tmp_path / "d")
    ds = FolderDataset(tmp_path / "d", missing_labels="skip", conventions=LabelConventions(1))
    assert [ds[i]["name"] for i in range(len(ds))] == ["a"]


def test_split_file_errors(voc):
    (voc / "ImageSets" / "bad.txt").write_text("a_001\nzzz_999\n")
    with pytest.raises(DatasetError, match=r"bad\.txt: 1 listed image\(s\) not found .*zzz_999"):
        FolderDataset(voc, "JPEGImages", "SegmentationClass", ".jpg", "_gt.png", "ImageSets/bad.txt")
    with pytest.raises(MissingDataError, match=r"split file .*none\.txt does not exist"):
        FolderDataset(voc, "JPEGImages", "SegmentationClass", ".jpg", "_gt.png", "ImageSets/none.txt")


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_unreadable_image(tmp_path, content):
    path = tmp_path / "d/images/a.png"
    if content == "truncated":
        save(rgb(64, 64), path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
    save(np.zeros((64, 64), np.uint8), tmp_path / "d/labels/a.png")
    ds = FolderDataset(tmp_path / "d", conventions=LabelConventions(1))
    with pytest.raises(DatasetError, match=r"images/a\.png: unreadable image"):
        ds[0]


def test_mask_size_differs(tmp_path):
    save(rgb(4, 6), tmp_path / "d/images/a.jpg")
    save(np.zeros((4, 5), np.uint8), tmp_path / "d/labels/a.png")
    with pytest.raises(DatasetError, match=r"labels/a\.png: label size 5x4 .* differs from its image .*images/a\.jpg \(6x4\)"):
        FolderDataset(tmp_path / "d")[0]


def test_label_out_of_range_names_file(tmp_path):
    save(rgb(4, 4), tmp_path / "d/images/a.jpg")
    save(np.array([[0, 1, 7, 255]] * 4, np.uint8), tmp_path / "d/labels/a.png")
    with pytest.raises(DatasetError, match=r"labels/a\.png: label values 7 are outside \[0, 2\)"):
        FolderDataset(tmp_path / "d", conventions=LabelConventions(2))[0]


def test_colour_label_is_rejected_but_grey_rgb_is_read(tmp_path):
    save(rgb(4, 4), tmp_path / "d/images/a.jpg")
    save(rgb(4, 4, 3), tmp_path / "d/labels/a.png")
    with pytest.raises(DatasetError, match=r"labels/a\.png: the label is a colour image"):
        FolderDataset(tmp_path / "d", conventions=LabelConventions(256))[0]
    save(np.repeat(np.full((4, 4, 1), 2, np.uint8), 3, axis=2), tmp_path / "d/labels/a.png")
    assert FolderDataset(tmp_path / "d", conventions=LabelConventions(3))[0]["label"].unique().tolist() == [2]


def test_relative_root_needs_a_data_root(monkeypatch):
    monkeypatch.delenv("OVSEG_DATA_ROOT", raising=False)
    spec = _suite({"type": "folder", "root": "somewhere"}).datasets[0]
    with pytest.raises(MissingDataError, match="OVSEG_DATA_ROOT"):
        spec.build(None)


# ---------------------------------------------------------------- check_dataset
def _suite(source, **extra):
    return parse_suite({"datasets": [{"name": "mini", "source": source, "classes": ["a", "b", "c"], **extra}]})


def test_check_dataset_statuses(tmp_path):
    root = tmp_path / "mini"
    for i in range(8):
        save(rgb(4, 4, i), root / f"images/s{i}.jpg")
        save(np.full((4, 4), i % 3, np.uint8), root / f"labels/s{i}.png")
    spec = _suite({"type": "folder", "root": "mini"}).datasets[0]
    status = check_dataset(spec, tmp_path)
    assert isinstance(status, DatasetStatus) and status.status == "found" and status.num_samples == 8
    assert status.checked == 5 and status.ok

    save(np.full((4, 4), 9, np.uint8), root / "labels/s3.png")  # index 3: not among the 5 sampled
    assert check_dataset(spec, tmp_path).status == "found"
    deep = check_dataset(spec, tmp_path, deep=True)
    assert deep.status == "malformed" and "s3.png" in deep.reason and "9" in deep.reason

    (root / "labels/s3.png").unlink()
    bad = check_dataset(spec, tmp_path)
    assert bad.status == "malformed" and "s3.jpg: image without a label" in bad.reason

    missing = check_dataset(spec, tmp_path / "elsewhere")
    assert missing.status == "missing" and "elsewhere/mini" in missing.reason


def test_unknown_source_keys_and_types():
    with pytest.raises(ConfigError, match=r"dataset mini: unknown key\(s\) \['label_sufix'\] in the folder source"):
        _suite({"type": "folder", "root": "x", "label_sufix": ".png"})
    with pytest.raises(ConfigError, match="source type must be one of folder, hf, demo"):
        _suite({"type": "zip", "root": "x"})
    with pytest.raises(ConfigError, match="folder source needs root"):
        _suite({"type": "folder"})
    with pytest.raises(ConfigError, match="source.recursive must be a bool"):
        _suite({"type": "folder", "root": "x", "recursive": "yes"})
    with pytest.raises(ConfigError, match="missing_labels must be one of"):
        _suite({"type": "folder", "root": "x", "missing_labels": "ignore"})
