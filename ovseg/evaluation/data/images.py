"""A source's images without their labels, for passes that never read labels (template ranking).

`image_dataset(source)` lists the images of a folder, demo or Hugging Face source as the evaluation
dataset would, but does not look for, open or decode a label: a folder of unlabeled images (no label
folder at all) is a valid source here. `with_split` points a source at another split of the same data.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from torch.utils.data import Dataset

from ovseg.errors import ConfigError
from .base import MissingDataError
from .folder import find_images
from .io import image_tensor
from .sources import DemoSource, FolderSource, HFSource, parse_source, resolve_root

__all__ = ["ImageDataset", "HFImageDataset", "image_dataset", "with_split", "with_overrides", "split_name"]


class ImageDataset(Dataset):
    """Samples `{"image": uint8 (3, H, W) RGB, "name": str, "path": str}` of image files `[(name, path)]`."""

    def __init__(self, items: list[tuple[str, Path]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, index: int) -> tuple[Any, str, str]:
        name, path = self.items[index]
        return path, name, str(path)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        source, name, where = self._read(index)
        return {"image": image_tensor(source, where), "name": name, "path": where}


class HFImageDataset(ImageDataset):
    """The image column of one split of a Hugging Face dataset (other columns not decoded)."""

    def __init__(self, source: HFSource, data_root):
        from .hf import HFDataset

        hf = HFDataset(source.path, source.split, source.image_column, None, source.name_column, source.config,
                       source.revision, data_root)
        self.where, self.image_column, self.name_column = hf.where, source.image_column, source.name_column
        self.rows = hf.dataset.select_columns([c for c in (source.image_column, source.name_column) if c])
        super().__init__([])

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, index: int) -> tuple[Any, str, str]:
        row = self.rows[index]
        name = str(row[self.name_column]) if self.name_column else f"{index:06d}"
        return row[self.image_column], name, f"{self.where} row {index} column {self.image_column!r}"


def _folder(root: Path, images: str, image_suffix: str | None, split_file: str | None, recursive: bool):
    image_dir = root / images
    if not image_dir.is_dir():
        raise MissingDataError(f"image folder {image_dir} does not exist")
    keys, paths = find_images(root, image_dir, image_suffix, split_file, recursive)
    return ImageDataset([(key, paths[key]) for key in keys])


def image_dataset(source, data_root: str | os.PathLike | None = None) -> ImageDataset:
    """The images of a source (`ovseg.evaluation.data.sources`), labels never opened."""
    if isinstance(source, FolderSource):
        root = resolve_root(source.root, data_root)
        return _folder(root, source.images, source.image_suffix, source.split_file, source.recursive)
    if isinstance(source, DemoSource):
        from .demo import ensure_demo

        return _folder(ensure_demo(Path(source.root).expanduser() if source.root else None), "images", ".png", None,
                       True)
    if isinstance(source, HFSource):
        return HFImageDataset(source, data_root)
    raise ConfigError(f"cannot list the images of a {type(source).__name__}")


def with_overrides(source, overrides: Mapping[str, Any], where: str):
    """The source with some keys replaced (`images`, `split_file`, `split`, ...), validated like a suite entry."""
    if not overrides:
        return source
    values = {"type": source.type, **dataclasses.asdict(source), **overrides}
    return parse_source(values, where)


def with_split(source, split: str | None, dataset: str):
    """The same data's `split`: a Hugging Face split, or the folder's split file of that name
    (`ImageSets/Segmentation/val.txt` -> `.../train.txt`). A folder without a split file has no other split."""
    if split is None:
        return source
    if isinstance(source, HFSource):
        return dataclasses.replace(source, split=split)
    if isinstance(source, FolderSource) and source.split_file:
        return dataclasses.replace(source, split_file=str(PurePosixPath(source.split_file).with_name(f"{split}.txt")))
    kind = "the demo source" if isinstance(source, DemoSource) else "its folder source has no split file"
    raise ConfigError(
        f"dataset {dataset}: --split {split}: {kind}, so the split's images cannot be found by name; point the "
        f"dataset at them with --source {dataset}.images=FOLDER (relative to the source root)"
    )


def split_name(source) -> str:
    """What the rankings file records as the split: the HF split, the split file's stem, or the image folder."""
    if isinstance(source, HFSource):
        return source.split or "default"
    if isinstance(source, FolderSource):
        return PurePosixPath(source.split_file).stem if source.split_file else PurePosixPath(source.images).name
    return "demo"
