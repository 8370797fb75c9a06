"""Reading a run folder into `RunResults`, through the run folder's own schema (`ovseg.evaluation.rundir`).

Unreadable, unknown or inconsistent result files become `failed` entries with the reason, and
datasets of the suite without a result file become `missing` ones: nothing is dropped silently.
Titles, domains and groups come from the suite entries stored in the run folder (never from the
suite file, which may have changed or be another suite of the same name).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ovseg.errors import OvsegError
from ovseg.evaluation.rundir import (
    NO_RESULT_FILE,
    STATUSES,
    DamagedManifest,
    DatasetRecord,
    Manifest,
    SuiteEntry,
    manifest_path,
    read_manifest,
    read_records,
)

#: one result of a run: the run folder's record type
DatasetResult = DatasetRecord

__all__ = ["DatasetResult", "RunResults", "load_run", "NO_RESULT_FILE", "STATUSES"]


@dataclass
class RunResults:
    run_dir: Path
    suite: str | None
    method: str | None
    order: list[str]  # dataset names in suite order
    datasets: dict[str, DatasetResult]
    random_weights: bool = False
    limit: int | None = None
    manifest: Manifest | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.run_dir.name


def load_run(run_dir: str | Path) -> RunResults:
    """Read a run folder. Datasets of the suite without a result file are listed as missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise OvsegError(f"run folder {run_dir} does not exist")
    if not manifest_path(run_dir).is_file() and not (run_dir / "datasets").is_dir():
        raise OvsegError(f"{run_dir} is not a run folder: it has neither config.yaml nor datasets/")
    try:
        manifest = read_manifest(run_dir)
    except DamagedManifest as exc:
        raise OvsegError(f"{exc}; rerun the bench with the same --output to rebuild it") from exc
    results = read_records(run_dir)

    suite = manifest.suite if manifest else _most_common(r.suite for r in results.values())
    method = manifest.method_name if manifest else None
    method = method or _most_common(r.method for r in results.values())
    entries = {e.name: e for e in manifest.entries} if manifest else {}
    order = list(entries) + [n for n in results if n not in entries]  # results of datasets the suite lacks
    published = manifest.published if manifest else {}
    for n in order:
        e = entries.get(n) or SuiteEntry(n)
        if n not in results:
            results[n] = DatasetResult(n, e.title or n, "missing", reason=NO_RESULT_FILE, domain=e.domain,
                                       group=e.group)
            continue
        r = results[n]
        # the suite entries as run are the reference for titles, domains and groups
        r.title = e.title or r.title
        r.domain = e.domain if e.domain is not None else r.domain
        r.group = e.group if e.group is not None else r.group
        if published:  # the method config's published numbers (a corrected number shows without a rerun)
            values = published.get("miou") if isinstance(published.get("miou"), dict) else {}
            r.published_miou = values.get(n) if isinstance(values.get(n), (int, float)) else None
            r.published_source = published.get("source")

    limit = manifest.identity.limit if manifest else None
    limit = limit if limit is not None else _most_common(r.limit for r in results.values())
    random_weights = bool(manifest and manifest.random_weights) or any(r.random_weights for r in results.values())
    return RunResults(run_dir, suite, method, order, results, random_weights, limit, manifest)


def _most_common(values: Iterable):
    values = [v for v in values if v is not None]
    return Counter(values).most_common(1)[0][0] if values else None
