"""Reading a run folder (`config.yaml`, `datasets/<name>.json`) into `RunResults`.

Unreadable, unknown or inconsistent result files become `failed` entries with the reason, and
datasets of the suite without a result file become `missing` ones: nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ovseg.errors import OvsegError
from .numbers import finite_or_none

STATUSES = ("done", "missing", "failed")


NO_RESULT_FILE = "no result file (not run yet, interrupted, or left out with --datasets)"


@dataclass
class DatasetResult:
    """One `datasets/<name>.json` (or a placeholder when the file does not exist)."""

    name: str
    title: str
    status: str
    reason: str | None = None
    domain: str | None = None
    group: str | None = None
    miou: float | None = None  # fraction
    biou: float | None = None  # fraction
    num_images: int | None = None
    published_miou: float | None = None  # percent, as papers print it
    published_source: str | None = None
    random_weights: bool = False
    elapsed_s: float | None = None
    per_class: dict | None = None
    raw: dict = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.status == "done"


@dataclass
class RunResults:
    run_dir: Path
    suite: str | None
    method: str | None
    order: list[str]  # dataset names in suite order
    datasets: dict[str, DatasetResult]
    random_weights: bool = False
    limit: int | None = None
    config: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.run_dir.name


def _read_yaml(path: Path) -> dict:
    import yaml  # PyYAML, a dependency of omegaconf

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise OvsegError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _suite_metadata(suite: str | None) -> dict[str, dict]:
    """Title/domain/group per dataset from the suite YAML, for datasets that left no result file.

    Without it a missing PAXRay-4 task would look like an unrelated dataset and its group would be
    averaged over the remaining tasks.
    """
    if not suite:
        return {}
    from ovseg.paths import config_dir

    path = config_dir() / "suites" / f"{suite}.yaml"
    try:
        doc = _read_yaml(path) if path.is_file() else {}
    except OvsegError:
        return {}
    out = {}
    for d in doc.get("datasets") or []:
        if isinstance(d, dict) and d.get("name"):
            out[str(d["name"])] = {k: d.get(k) for k in ("title", "domain", "group")}
    return out


def _parse_result(path: Path, name: str) -> DatasetResult:
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return DatasetResult(name, name, "failed", reason=f"unreadable result file {path.name}: {exc}")
    status = raw.get("status")
    reason = raw.get("reason")
    miou, biou = finite_or_none(raw.get("miou")), finite_or_none(raw.get("biou"))
    if status not in STATUSES:
        status, reason = "failed", f"unknown status {status!r} in {path.name}"
    elif status == "done" and miou is None:
        status, reason = "failed", f"{path.name} says done but has no finite mIoU"
    published = raw.get("published") if isinstance(raw.get("published"), dict) else {}
    return DatasetResult(
        name=name,  # the file stem: the key the suite order uses
        title=str(raw.get("title") or raw.get("dataset") or name),
        status=status,
        reason=reason,
        domain=raw.get("domain"),
        group=raw.get("group"),
        miou=miou if status == "done" else None,
        biou=biou if status == "done" else None,
        num_images=raw.get("num_images") if isinstance(raw.get("num_images"), int) else None,
        published_miou=finite_or_none(published.get("miou")),
        published_source=published.get("source"),
        random_weights=bool(raw.get("random_weights", False)),
        elapsed_s=finite_or_none(raw.get("elapsed_s")),
        per_class=raw.get("per_class"),
        raw=raw,
    )


def load_run(run_dir: str | Path) -> RunResults:
    """Read a run folder. Datasets of the suite without a result file are listed as missing."""
    run_dir = Path(run_dir)
    config_path, results_dir = run_dir / "config.yaml", run_dir / "datasets"
    if not run_dir.is_dir():
        raise OvsegError(f"run folder {run_dir} does not exist")
    if not config_path.is_file() and not results_dir.is_dir():
        raise OvsegError(f"{run_dir} is not a run folder: it has neither config.yaml nor datasets/")
    config = _read_yaml(config_path) if config_path.is_file() else {}

    results = {p.stem: _parse_result(p, p.stem) for p in sorted(results_dir.glob("*.json"))}
    suite_cfg, method_cfg = config.get("suite"), config.get("method")
    suite = suite_cfg.get("name") if isinstance(suite_cfg, dict) else suite_cfg
    method = method_cfg.get("name") if isinstance(method_cfg, dict) else method_cfg
    if not suite or not method:  # fall back on what the result files say
        suite = suite or _most_common(r.raw.get("suite") for r in results.values())
        method = method or _most_common(r.raw.get("method") for r in results.values())

    listed = suite_cfg.get("datasets") if isinstance(suite_cfg, dict) else None
    order = [str(n) for n in listed or []]
    order += [n for n in results if n not in order]  # results of datasets the config does not list
    meta = _suite_metadata(suite)
    for n in order:
        m = meta.get(n, {})
        if n not in results:
            results[n] = DatasetResult(n, m.get("title") or n, "missing", reason=NO_RESULT_FILE,
                                       domain=m.get("domain"), group=m.get("group"))
        else:  # older or partial JSONs: fill what they lack from the suite
            r = results[n]
            r.domain = r.domain if r.domain is not None else m.get("domain")
            r.group = r.group if r.group is not None else m.get("group")
            if r.title == n and m.get("title"):
                r.title = m["title"]

    limit = config.get("limit")
    limit = limit if isinstance(limit, int) else _most_common(r.raw.get("limit") for r in results.values())
    random_weights = bool(config.get("random_weights")) or any(r.random_weights for r in results.values())
    return RunResults(run_dir, suite, method, order, results, random_weights, limit, config)


def _most_common(values: Iterable[Any]):
    values = [v for v in values if v is not None]
    return Counter(values).most_common(1)[0][0] if values else None
