"""Folder source: images and label PNGs paired by relative path and stem.

Covers the mmseg layouts (`JPEGImages` + `SegmentationClass` + a split file), MESS's
`images_detectron2` / `annotations_detectron2`, and nested layouts such as Cityscapes
`leftImg8bit/val/<city>/<stem>_leftImg8bit.png` + `gtFine/val/<city>/<stem>_gtFine_labelTrainIds.png`:
the image folder is searched recursively, the dataset-specific suffixes are stripped, and an image
is paired with the label of the same relative key (or, failing that, the one label of the same stem).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path

from ovseg.errors import DatasetError
from .base import MissingDataError, SegmentationDataset
from .conventions import LabelConventions
from .io import IMAGE_EXTENSIONS


def _walk(folder: Path, recursive: bool):
    """Relative posix paths of the visible files under `folder` (symlinked folders followed)."""
    if not recursive:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_file() and not entry.name.startswith("."):
                yield entry.name
        return
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(folder)
        for name in sorted(filenames):
            if not name.startswith("."):  # skips ._* AppleDouble files and hidden state
                yield (rel / name).as_posix()


def _strip(rel: str, suffix: str | None, extensions=IMAGE_EXTENSIONS) -> str | None:
    """Key of a file: its relative path without `suffix` (case-insensitive), or None if it does not match."""
    name = rel.rsplit("/", 1)[-1].lower()
    if suffix is None:
        ext = os.path.splitext(name)[1]
        return rel[: -len(ext)] if ext in extensions and len(name) > len(ext) else None
    if name.endswith(suffix.lower()) and len(name) > len(suffix):
        return rel[: -len(suffix)]
    return None


def _read_split(path: Path, image_suffix: str | None) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError as exc:
        raise MissingDataError(f"split file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: unreadable split file ({exc})") from exc
    stems = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        token = line.split()[0]
        stems.append(_strip(token, image_suffix) or token)
    if not stems:
        raise DatasetError(f"{path}: the split file lists no images")
    return stems


def find_images(
    root: Path, image_dir: Path, image_suffix: str | None, split_file: str | None, recursive: bool
) -> tuple[list[str], dict[str, Path]]:
    """The images of a folder source: their keys (sorted, or in split-file order) and key -> path.

    A split file lists stems (or relative keys); a stem matches the image of that key or the one image
    with that stem. No image, or a listed image that is not there, is a DatasetError naming the folder.
    """
    images_by_key = {}
    for rel in _walk(image_dir, recursive):
        key = _strip(rel, image_suffix)
        if key is not None:
            images_by_key[key] = image_dir / rel
    if not images_by_key:
        pattern = f"*{image_suffix}" if image_suffix else "images (" + ", ".join(IMAGE_EXTENSIONS) + ")"
        raise DatasetError(f"no {pattern} found under {image_dir}" + (" (searched recursively)" if recursive else ""))
    keys = sorted(images_by_key)
    if split_file is None:
        return keys, images_by_key
    split_path = Path(split_file) if Path(split_file).is_absolute() else root / split_file
    wanted = _read_split(split_path, image_suffix)
    by_stem = defaultdict(list)
    for key in keys:
        by_stem[key.rsplit("/", 1)[-1]].append(key)
    keys, unknown = [], []
    for stem in wanted:
        if stem in images_by_key:
            keys.append(stem)
        elif len(by_stem.get(stem, ())) == 1:
            keys.append(by_stem[stem][0])
        else:
            unknown.append(stem)
    if unknown:
        raise DatasetError(
            f"{split_path}: {len(unknown)} listed image(s) not found under {image_dir}"
            f"{' with suffix ' + image_suffix if image_suffix else ''}, e.g. {', '.join(unknown[:3])}"
        )
    return keys, images_by_key


class FolderDataset(SegmentationDataset):
    """Images under `root/images`, labels under `root/labels`, paired by relative key.

    `missing_labels="skip"` evaluates only the images that have a label (detectron2's
    `load_sem_seg` does that silently; here it must be asked for, e.g. MESS CWFID, whose `images/`
    holds the training images too).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        images: str = "images",
        labels: str = "labels",
        image_suffix: str | None = None,
        label_suffix: str = ".png",
        split_file: str | None = None,
        recursive: bool = True,
        missing_labels: str = "error",
        conventions: LabelConventions | None = None,
    ):
        super().__init__(conventions or LabelConventions(256))
        if missing_labels not in ("error", "skip"):
            raise ValueError(f"missing_labels must be 'error' or 'skip', got {missing_labels!r}")
        self.root = Path(root)
        self.image_dir, self.label_dir = self.root / images, self.root / labels
        if not self.root.is_dir():
            raise MissingDataError(f"dataset folder {self.root} does not exist")
        for what, folder in (("image folder", self.image_dir), ("label folder", self.label_dir)):
            if not folder.is_dir():
                raise MissingDataError(f"{what} {folder} does not exist")

        keys, images_by_key = find_images(self.root, self.image_dir, image_suffix, split_file, recursive)

        labels_by_key, labels_by_stem = {}, defaultdict(list)
        for rel in _walk(self.label_dir, recursive):
            key = _strip(rel, label_suffix)
            if key is not None:
                labels_by_key[key] = self.label_dir / rel
                labels_by_stem[key.rsplit("/", 1)[-1]].append(self.label_dir / rel)

        items, missing = [], []
        for key in keys:
            stem = key.rsplit("/", 1)[-1]
            label = labels_by_key.get(key)
            if label is None and len(labels_by_stem.get(stem, ())) == 1:
                label = labels_by_stem[stem][0]
            if label is None:
                missing.append(key)
            else:
                items.append((key, images_by_key[key], label))
        if missing and missing_labels == "error":
            first = missing[0]
            raise DatasetError(
                f"{images_by_key[first]}: image without a label (expected {self.label_dir / (first + label_suffix)})"
                + (f"; {len(missing)} of {len(keys)} images have no label" if len(missing) > 1 else "")
                + "; set `missing_labels: skip` in the source to evaluate only the labelled images"
            )
        if not items:
            raise DatasetError(f"none of the {len(keys)} images under {self.image_dir} has a label in {self.label_dir}")
        # names are stems; where stems repeat across subfolders, the relative key keeps them apart
        counts = Counter(key.rsplit("/", 1)[-1] for key, _, _ in items)
        self.items = []
        for key, image, label in items:
            stem = key.rsplit("/", 1)[-1]
            self.items.append((stem if counts[stem] == 1 else key.replace("/", "__"), image, label))

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, index: int):
        name, image, label = self.items[index]
        return image, label, name, str(image), str(label)
