"""Evaluation suites: YAML lists of datasets, loaded with omegaconf into validated dataclasses.

Schema of a suite file (`configs/suites/<name>.yaml`)::

    name: standard8                     # optional, defaults to the file stem
    description: "..."                  # optional
    datasets:
      - name: voc21                     # required; id used in results and method overrides (unique)
        title: "PASCAL VOC 2012 (21)"   # optional, defaults to name
        domain: general                 # optional: MESS domain for per-domain means
        group: null                     # optional: datasets sharing a group are averaged into one entry
                                        #   before the suite mean (PAXRay-4)
        source: {type: folder, root: VOCdevkit/VOC2012, images: JPEGImages, labels: SegmentationClass,
                 image_suffix: .jpg, label_suffix: .png, split_file: ImageSets/Segmentation/val.txt}
          # or {type: hf, path: ..., split: validation, image_column: image, label_column: annotation}
          # or {type: demo}  (the generated demo dataset); all keys: ovseg.evaluation.data.sources
        classes: ["background, sky, wall", aeroplane, ...]   # synonyms comma-separated, or a list
        # or classes_file: classes/voc21.txt   (relative to the suite file; one class per line)
        shared_names: [bed]             # optional: names allowed in two classes (ovseg.vocabulary)
        ignore_index: 255               # optional (255)
        reduce_zero_label: false        # optional (false): 0 -> ignore, k -> k-1
        label_map: {}                   # optional raw-value remap {from: to}, applied before reduce_zero_label
        protocol: {short_side: 448, crop: 224, stride: 112}  # optional: fields of ovseg.protocol.Protocol

Source roots are relative to the data root (`--data-root` / `OVSEG_DATA_ROOT`) unless absolute.
Unknown keys, missing fields and invalid values raise a ConfigError naming the suite file and the
dataset. `DatasetSpec.protocol` keeps only the keys the suite sets (a mapping), so method configs
and the command line can be layered on top (`ovseg.evaluation.methods.dataset_protocol`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf

from ovseg.errors import ConfigError
from ovseg.paths import config_dir
from ovseg.pipeline.protocol import Protocol

_SUITE_KEYS = {"name", "description", "datasets"}
_DATASET_KEYS = {
    "name", "title", "domain", "group", "source", "classes", "classes_file", "shared_names", "ignore_index",
    "reduce_zero_label", "label_map", "protocol",
}


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a suite: where its data is, its classes, label conventions and protocol."""

    name: str
    source: Any  # ovseg.evaluation.data.sources.FolderSource | HFSource | DemoSource
    classes: list
    title: str
    domain: str | None = None
    group: str | None = None
    ignore_index: int = 255
    reduce_zero_label: bool = False
    label_map: dict[int, int] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)
    suite_path: Path | None = None
    shared_names: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def vocabulary(self):
        from ovseg.pipeline.vocabulary import Vocabulary

        return Vocabulary(self.classes, self.shared_names)

    @property
    def conventions(self):
        from .data.conventions import LabelConventions

        return LabelConventions(self.num_classes, self.ignore_index, self.reduce_zero_label, self.label_map)

    def resolved_protocol(self) -> Protocol:
        """The suite's protocol alone (Protocol defaults for keys it does not set)."""
        return Protocol.from_dict(self.protocol, where=f"dataset {self.name}")

    def build(self, data_root: str | os.PathLike | None = None):
        """The torch `Dataset` of this entry; relative source roots are resolved under `data_root`
        (default `ovseg.paths.data_root()`). Raises DatasetError (MissingDataError if absent)."""
        return self.source.build(self.conventions, data_root)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    datasets: list[DatasetSpec]
    path: Path | None = None

    def __getitem__(self, name: str) -> DatasetSpec:
        for spec in self.datasets:
            if spec.name == name:
                return spec
        raise KeyError(f"suite {self.name} has no dataset {name!r} ({', '.join(d.name for d in self.datasets)})")


# ---------------------------------------------------------------- registered suites (entry points)
def _suite_file(name: str) -> Path:
    return config_dir() / "suites" / f"{name}.yaml"


def demo() -> Path:
    """The embedded demo suite (generated data, no download)."""
    return _suite_file("demo")


def standard8() -> Path:
    """The 8 standard training-free OVSS benchmarks."""
    return _suite_file("standard8")


def mess22() -> Path:
    """MESS-22, the multi-domain benchmark."""
    return _suite_file("mess22")


# ---------------------------------------------------------------- loading
def _looks_like_path(text: str) -> bool:
    return text.endswith((".yaml", ".yml")) or os.sep in text or "/" in text or Path(text).is_file()


def resolve_suite_path(name_or_path: str | os.PathLike) -> Path:
    """A YAML path as given, or the file a registered suite name points to."""
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(str(name_or_path)):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"suite file {path} does not exist")
        return path
    from ovseg.registry import load_plugin

    path = Path(load_plugin("suite", str(name_or_path))())
    if not path.is_file():
        raise ConfigError(f"suite {name_or_path!r} is registered but its file {path} does not exist")
    return path


def load_suite(name_or_path: str | os.PathLike) -> Suite:
    """Load a suite by registered name (`ovseg.suites` entry points) or YAML path."""
    path = resolve_suite_path(name_or_path)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:  # noqa: BLE001 - YAML syntax and interpolation errors alike
        raise ConfigError(f"{path}: cannot read the suite ({type(exc).__name__}: {exc})") from exc
    return parse_suite(raw, path)


def parse_suite(raw: Any, path: Path | None = None) -> Suite:
    """Validate a suite given as plain data (what the YAML holds)."""
    where = str(path) if path is not None else "suite"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: a suite must be a mapping with `datasets`, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _SUITE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(_SUITE_KEYS)}")
    entries = raw.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: `datasets` must be a non-empty list")
    specs = [_parse_dataset(entry, i, where, path) for i, entry in enumerate(entries)]
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(f"{where}: dataset name {spec.name!r} appears twice")
        seen.add(spec.name)
    name = raw.get("name") or (path.stem if path is not None else "suite")
    return Suite(str(name), str(raw.get("description") or ""), specs, path)


def _read_classes_file(file: str, where: str, path: Path | None) -> list[str]:
    p = Path(file).expanduser()
    if not p.is_absolute() and path is not None:
        p = path.parent / p
    try:
        lines = p.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read classes_file {p} ({exc})") from exc
    return [line.strip() for line in lines if line.strip()]


def _parse_dataset(entry: Any, index: int, where: str, path: Path | None) -> DatasetSpec:
    from .data.sources import parse_source
    from ovseg.pipeline.vocabulary import Vocabulary

    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: datasets[{index}] must be a mapping, got {entry!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: datasets[{index}] needs a `name` (a non-empty string)")
    here = f"{where}: dataset {name}"
    unknown = sorted(set(entry) - _DATASET_KEYS)
    if unknown:
        raise ConfigError(f"{here}: unknown key(s) {unknown}; known: {sorted(_DATASET_KEYS)}")
    if "source" not in entry:
        raise ConfigError(f"{here}: missing `source`")
    source = parse_source(entry["source"], here)

    if ("classes" in entry) == ("classes_file" in entry):
        raise ConfigError(f"{here}: give exactly one of `classes` and `classes_file`")
    classes = entry["classes"] if "classes" in entry else _read_classes_file(entry["classes_file"], here, path)
    shared_names = entry.get("shared_names", [])
    if isinstance(shared_names, str) or not isinstance(shared_names, Sequence):
        raise ConfigError(f"{here}: `shared_names` must be a list of names, got {shared_names!r}")
    try:
        Vocabulary(classes, shared_names)
    except ConfigError as exc:
        raise ConfigError(f"{here}: {exc}") from exc
    classes = list(classes)

    def typed(key, kind, default):
        value = entry.get(key, default)
        if value is None and default is None:
            return None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{here}: `{key}` must be {getattr(kind, '__name__', kind)}, got {value!r}")
        return value

    ignore_index = typed("ignore_index", int, 255)
    reduce_zero_label = typed("reduce_zero_label", bool, False)
    label_map = typed("label_map", Mapping, {}) or {}
    try:
        label_map = {int(k): int(v) for k, v in label_map.items()}
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{here}: `label_map` keys and values must be integers, got {label_map!r}") from exc
    if any(k < 0 or v < 0 for k, v in label_map.items()):
        raise ConfigError(f"{here}: `label_map` values must be non-negative, got {label_map!r}")
    protocol = dict(typed("protocol", Mapping, {}) or {})
    Protocol.from_dict(protocol, where=f"{here}: protocol")  # validate now, keep only what the suite sets

    title = typed("title", str, None) or name
    domain = typed("domain", str, None)
    group = typed("group", str, None)
    return DatasetSpec(name, source, classes, title, domain, group, ignore_index, reduce_zero_label,
                       label_map, protocol, path, tuple(shared_names))
