"""Source entries of a suite (`source: {type: ..., ...}`): parsed, validated, and built into datasets.

| type   | keys (default)                                                                                |
|--------|-----------------------------------------------------------------------------------------------|
| folder | root (required), images (images), labels (labels), image_suffix (any image extension),        |
|        | label_suffix (.png), split_file (none; relative to root), recursive (true),                   |
|        | missing_labels (error; or skip)                                                                |
| hf     | path (required: save_to_disk folder, parquet file/folder, or hub id), split (the only one),   |
|        | image_column (image), label_column (label), name_column (row index), config, revision         |
| demo   | root (cache_dir()/demo): the generated demo dataset, made on first use                        |

`root` / `path` are relative to the data root unless absolute (a hub id is neither).
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping, Union, get_type_hints

from ovseg.errors import ConfigError
from .base import MissingDataError, SegmentationDataset
from .conventions import LabelConventions


def resolve_root(root: str, data_root: str | os.PathLike | None) -> Path:
    """`root` as given when absolute, else under the data root (which must then be set)."""
    path = Path(root).expanduser()
    if path.is_absolute():
        return path
    if data_root is None:
        from ovseg.paths import data_root as default_data_root

        data_root = default_data_root()
    if data_root is None:
        raise MissingDataError(
            f"{root!r} is relative to the data root, but none is set: pass --data-root or set OVSEG_DATA_ROOT"
        )
    return Path(data_root).expanduser() / path


@dataclass(frozen=True)
class FolderSource:
    type: ClassVar[str] = "folder"
    root: str
    images: str = "images"
    labels: str = "labels"
    image_suffix: str | None = None
    label_suffix: str = ".png"
    split_file: str | None = None
    recursive: bool = True
    missing_labels: str = "error"

    def build(self, conventions: LabelConventions, data_root=None) -> SegmentationDataset:
        from .folder import FolderDataset

        return FolderDataset(
            resolve_root(self.root, data_root), self.images, self.labels, self.image_suffix, self.label_suffix,
            self.split_file, self.recursive, self.missing_labels, conventions,
        )


@dataclass(frozen=True)
class HFSource:
    type: ClassVar[str] = "hf"
    path: str
    split: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    name_column: str | None = None
    config: str | None = None
    revision: str | None = None

    def build(self, conventions: LabelConventions, data_root=None) -> SegmentationDataset:
        from ovseg.paths import data_root as default_data_root
        from .hf import HFDataset

        return HFDataset(
            self.path, self.split, self.image_column, self.label_column, self.name_column, self.config,
            self.revision, data_root if data_root is not None else default_data_root(), conventions,
        )


@dataclass(frozen=True)
class DemoSource:
    type: ClassVar[str] = "demo"
    root: str | None = None

    def build(self, conventions: LabelConventions, data_root=None) -> SegmentationDataset:
        from .demo import ensure_demo
        from .folder import FolderDataset

        root = ensure_demo(Path(self.root).expanduser() if self.root else None)
        return FolderDataset(root, "images", "labels", ".png", ".png", conventions=conventions)


Source = Union[FolderSource, HFSource, DemoSource]
SOURCE_TYPES: dict[str, type] = {cls.type: cls for cls in (FolderSource, HFSource, DemoSource)}
_CHOICES = {"missing_labels": ("error", "skip")}


def parse_source(values: Mapping[str, Any], where: str) -> Source:
    """Validate a `source:` mapping into a source dataclass; ConfigError naming `where` otherwise."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: source must be a mapping with a `type`, got {values!r}")
    values = dict(values)
    kind = values.pop("type", None)
    if kind not in SOURCE_TYPES:
        raise ConfigError(f"{where}: source type must be one of {', '.join(SOURCE_TYPES)}, got {kind!r}")
    cls = SOURCE_TYPES[kind]
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} in the {kind} source; known: {sorted(known)}")
    missing = [n for n, f in known.items() if f.default is MISSING and n not in values]
    if missing:
        raise ConfigError(f"{where}: the {kind} source needs {', '.join(missing)}")
    hints = get_type_hints(cls)
    for name, value in values.items():
        expected = bool if hints[name] is bool else str
        optional = known[name].default is None
        if not (isinstance(value, expected) or (value is None and optional)):
            raise ConfigError(f"{where}: source.{name} must be a {expected.__name__}, got {value!r}")
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ConfigError(f"{where}: source.{name} must be one of {_CHOICES[name]}, got {value!r}")
    return cls(**values)
