"""The run folder's schema: a typed manifest and per-dataset result records, written and read only here.

    <run>/config.yaml            the manifest: what was run (`Manifest`)
    <run>/datasets/<name>.json   one result per dataset (`DatasetRecord`): done | missing | failed
    <run>/.lock                  held by the bench writing the folder (`ovseg.evaluation.runlock`)
    <run>/summary.md, .csv       written by the report layer from the two above
    <run>/examples/<name>/*.png  pictures (`--save-examples`); <run>/wandb/ (`--wandb`)

A run's identity is what changes its numbers: the resolved method config without its free-text
`description` and its `published` numbers, the suite's name, `--limit`, the precision and the
`protocol.*` overrides. A folder is resumed only with the same identity (its digest names the
default folder and is stored in the manifest and in every record). What a suite's entry holds is
guarded per dataset by each record's `definition` digest (see `ovseg.evaluation.bench`).

Folders written before the schema had a version (config.yaml without `schema:`) have the same
layout and are read the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from ovseg.errors import OvsegError

from ovseg import atomic

SCHEMA = 2
MANIFEST = "config.yaml"
RESULTS = "datasets"
STATUSES = ("done", "missing", "failed")
#: method config keys that do not change numbers: never part of the identity
DESCRIPTIVE_KEYS = ("description", "published")
NO_RESULT_FILE = "no result file (not run yet, interrupted, or left out with --datasets)"


class DamagedManifest(OvsegError):
    """config.yaml exists but cannot be read as a manifest (truncated, edited, not YAML)."""


def _digest(doc: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:n]


# ---------------------------------------------------------------- identity and manifest
@dataclass(frozen=True)
class Identity:
    """What a run's numbers depend on, besides the suite entries themselves (see the module docstring)."""

    method: Mapping[str, Any]
    suite: str
    limit: int | None = None
    precision: str = "32-true"
    protocol_overrides: tuple[str, ...] = ()

    @classmethod
    def of(cls, method: Mapping[str, Any], suite: str, limit: int | None = None, precision: str = "32-true",
           protocol_overrides: Iterable[str] = ()) -> "Identity":
        numbers = {k: v for k, v in dict(method).items() if k not in DESCRIPTIVE_KEYS}
        return cls(numbers, str(suite), limit, precision or "32-true", tuple(protocol_overrides or ()))

    def as_dict(self) -> dict[str, Any]:
        return {"method": dict(self.method), "suite": self.suite, "limit": self.limit, "precision": self.precision,
                "protocol_overrides": list(self.protocol_overrides)}

    @property
    def digest(self) -> str:
        return _digest(self.as_dict())

    def differences(self, other: "Identity") -> list[str]:
        """Names of what differs, method keys one by one (`method.refiner`, `limit`)."""
        a, b = self.as_dict(), other.as_dict()
        out = [f"method.{k}" for k in sorted(set(a["method"]) | set(b["method"]))
               if a["method"].get(k) != b["method"].get(k)]
        return out + [k for k in ("suite", "limit", "precision", "protocol_overrides") if a[k] != b[k]]


@dataclass(frozen=True)
class SuiteEntry:
    """A dataset of the suite as reports need it, kept so that they never re-read the suite file.
    (Hand-written folders may list names only: the other fields are then None.)"""

    name: str
    title: str | None = None
    domain: str | None = None
    group: str | None = None


@dataclass
class Manifest:
    """config.yaml: the identity, the full method config, the suite's entries and the environment."""

    identity: Identity
    method: dict[str, Any]  # the resolved method config, description and published numbers included
    entries: list[SuiteEntry]
    random_weights: bool | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    wandb_id: str | None = None
    schema: int = SCHEMA

    @property
    def method_name(self) -> str | None:
        name = self.method.get("name")
        return str(name) if name is not None else None

    @property
    def suite(self) -> str:
        return self.identity.suite

    @property
    def published(self) -> dict[str, Any]:
        value = self.method.get("published")
        return value if isinstance(value, dict) else {}

    def to_doc(self) -> dict[str, Any]:
        ident = self.identity
        return {
            "schema": self.schema,
            "identity": ident.digest,
            "method": self.method,
            "suite": {"name": ident.suite, "datasets": [e.name for e in self.entries],
                      "entries": [dataclasses.asdict(e) for e in self.entries]},
            "limit": ident.limit,
            "precision": ident.precision,
            "protocol_overrides": list(ident.protocol_overrides),
            "random_weights": self.random_weights,
            "environment": self.environment,
            "wandb_id": self.wandb_id,
        }

    @classmethod
    def from_doc(cls, doc: Any, where: str = MANIFEST) -> "Manifest":
        """Parse a manifest (any schema this code wrote); DamagedManifest naming what is wrong."""
        if not isinstance(doc, dict):
            raise DamagedManifest(f"{where} is not a mapping")
        method, suite = doc.get("method"), doc.get("suite")
        if isinstance(method, str):  # hand-written folders name the method only
            method = {"name": method}
        if not isinstance(method, dict):
            raise DamagedManifest(f"{where} has no `method` mapping")
        if isinstance(suite, str):
            suite = {"name": suite}
        if not isinstance(suite, dict) or not suite.get("name"):
            raise DamagedManifest(f"{where} has no `suite` with a name")
        entries = []
        raw_entries = suite.get("entries")
        if isinstance(raw_entries, list) and raw_entries:
            for e in raw_entries:
                if not isinstance(e, dict) or not e.get("name"):
                    raise DamagedManifest(f"{where}: suite entry {e!r} has no name")
                name = str(e["name"])
                entries.append(SuiteEntry(name, e.get("title"), e.get("domain"), e.get("group")))
        else:
            entries = [SuiteEntry(str(n)) for n in suite.get("datasets") or []]
        limit = doc.get("limit")
        identity = Identity.of(method, suite["name"], limit if isinstance(limit, int) else None,
                               doc.get("precision") or "32-true", doc.get("protocol_overrides") or ())
        random_weights = doc.get("random_weights")
        environment = doc.get("environment")
        return cls(identity, method, entries, random_weights if isinstance(random_weights, bool) else None,
                   environment if isinstance(environment, dict) else {}, doc.get("wandb_id"),
                   int(doc.get("schema") or 1))


def manifest_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / MANIFEST


def read_manifest(run_dir: str | Path) -> Manifest | None:
    """The folder's manifest, None when it has none; DamagedManifest when it cannot be read."""
    path = manifest_path(run_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise DamagedManifest(f"cannot read {path}: {exc}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise DamagedManifest(f"{path} is not valid YAML ({getattr(exc, 'problem', None) or exc}{where})") from exc
    return Manifest.from_doc(doc, str(path))


def write_manifest(run_dir: str | Path, manifest: Manifest) -> None:
    atomic.write_text(manifest_path(run_dir), yaml.safe_dump(manifest.to_doc(), sort_keys=False, allow_unicode=True))


# ---------------------------------------------------------------- per-dataset records
COST_FIELDS = ("data_s_per_image", "model_s_per_image", "refiner_s_per_image", "total_s_per_image",
               "peak_rss_mb", "peak_gpu_mb")


@dataclass
class Cost:
    """Seconds one process spends per image (summed over processes, divided by the images) and peak
    memory of the busiest process. `total` is data + model + refiner + everything else (merging,
    resizing, metrics)."""

    data_s_per_image: float | None = None
    model_s_per_image: float | None = None
    refiner_s_per_image: float | None = None
    total_s_per_image: float | None = None
    peak_rss_mb: float | None = None
    peak_gpu_mb: float | None = None  # None: no accelerator was used

    @classmethod
    def from_json(cls, raw: Any) -> "Cost | None":
        if not isinstance(raw, dict):
            return None
        return cls(**{k: _finite(raw.get(k)) for k in COST_FIELDS})


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def finite_list(values: Iterable[Any]) -> list[float | None]:
    """Floats with NaN/inf as None: JSON has no NaN."""
    return [_finite(v) for v in values]


@dataclass
class DatasetRecord:
    """`datasets/<name>.json`. Fractions for mIoU / Boundary IoU; published numbers in percent."""

    name: str
    title: str
    status: str  # done | missing | failed
    reason: str | None = None
    file: str | None = None  # the file a failure is about, when one is
    suite: str | None = None
    domain: str | None = None
    group: str | None = None
    method: str | None = None
    miou: float | None = None
    biou: float | None = None
    num_images: int | None = None
    per_class: dict | None = None
    published_miou: float | None = None
    published_source: str | None = None
    random_weights: bool = False
    limit: int | None = None
    elapsed_s: float | None = None
    cost: Cost | None = None
    protocol: dict | None = None
    definition: str | None = None  # digest of the dataset's suite entry as run
    identity: str | None = None  # digest of the run's identity
    traceback: str | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def done(self) -> bool:
        return self.status == "done"

    def to_json(self) -> dict[str, Any]:
        doc = {
            "schema": SCHEMA, "dataset": self.name, "title": self.title, "suite": self.suite, "domain": self.domain,
            "group": self.group, "method": self.method, "status": self.status, "reason": self.reason,
            "file": self.file, "num_images": self.num_images, "miou": _finite(self.miou),
            "biou": _finite(self.biou), "per_class": self.per_class, "random_weights": self.random_weights,
            "limit": self.limit, "elapsed_s": self.elapsed_s,
            "cost": dataclasses.asdict(self.cost) if self.cost is not None else None,
            "protocol": self.protocol, "definition": self.definition, "identity": self.identity,
            "published": {"miou": self.published_miou, "source": self.published_source},
        }
        if self.traceback:
            doc["traceback"] = self.traceback
        return doc

    @classmethod
    def from_json(cls, raw: Any, name: str, where: str) -> "DatasetRecord":
        """A record from parsed JSON; anything inconsistent becomes a `failed` record saying why."""
        if not isinstance(raw, dict):
            return cls(name, name, "failed", reason=f"unreadable result file {where}: not a JSON object")
        status, reason = raw.get("status"), raw.get("reason")
        miou, biou = _finite(raw.get("miou")), _finite(raw.get("biou"))
        if status not in STATUSES:
            status, reason = "failed", f"unknown status {status!r} in {where}"
        elif status == "done" and miou is None:
            status, reason = "failed", f"{where} says done but has no finite mIoU"
        published = raw.get("published") if isinstance(raw.get("published"), dict) else {}
        num_images, limit = raw.get("num_images"), raw.get("limit")
        return cls(
            name=name,  # the file stem: the key suite order and resuming use
            title=str(raw.get("title") or raw.get("dataset") or name),
            status=status,
            reason=reason if isinstance(reason, str) else None,
            file=raw.get("file") if isinstance(raw.get("file"), str) else None,
            suite=raw.get("suite"),
            domain=raw.get("domain"),
            group=raw.get("group"),
            method=raw.get("method"),
            miou=miou if status == "done" else None,
            biou=biou if status == "done" else None,
            num_images=num_images if isinstance(num_images, int) and not isinstance(num_images, bool) else None,
            per_class=raw.get("per_class") if isinstance(raw.get("per_class"), dict) else None,
            published_miou=_finite(published.get("miou")),
            published_source=published.get("source"),
            random_weights=bool(raw.get("random_weights", False)),
            limit=limit if isinstance(limit, int) and not isinstance(limit, bool) else None,
            elapsed_s=_finite(raw.get("elapsed_s")),
            cost=Cost.from_json(raw.get("cost")),
            protocol=raw.get("protocol") if isinstance(raw.get("protocol"), dict) else None,
            definition=raw.get("definition"),
            identity=raw.get("identity"),
            traceback=raw.get("traceback"),
            raw=raw,
        )


def record_path(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / RESULTS / f"{name}.json"


def read_record(path: str | Path) -> DatasetRecord:
    """Never raises: an unreadable or inconsistent file is a `failed` record naming it."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(), parse_constant=_refuse_constant)
    except (OSError, ValueError) as exc:
        return DatasetRecord(path.stem, path.stem, "failed", reason=f"unreadable result file {path.name}: {exc}")
    return DatasetRecord.from_json(raw, path.stem, path.name)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def read_records(run_dir: str | Path) -> dict[str, DatasetRecord]:
    """Every `datasets/*.json` of the folder by dataset name (temporary files of writes are not results)."""
    folder = Path(run_dir) / RESULTS
    return {p.stem: read_record(p) for p in sorted(folder.glob("*.json")) if not p.name.startswith(".")}


def write_record(run_dir: str | Path, record: DatasetRecord) -> Path:
    path = record_path(run_dir, record.name)
    atomic.write_text(path, json.dumps(record.to_json(), indent=2, allow_nan=False) + "\n")
    return path
