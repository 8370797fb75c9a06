"""A run's entries and means: groups averaged first (PAXRay-4), plain means with honest counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ovseg.evaluation.rundir import Cost

from .numbers import mean_of, pct
from .results import DatasetResult, RunResults


@dataclass
class Entry:
    """A row that counts once in the means: one dataset, or one group of datasets (PAXRay-4)."""

    name: str
    title: str
    domain: str | None
    status: str  # done | missing | failed | incomplete (a group with a member not done)
    reason: str | None
    miou: float | None  # fraction; a group: mean of its members
    biou: float | None
    num_images: int | None
    published_miou: float | None  # percent
    published_source: str | None = None
    members: list[DatasetResult] = field(default_factory=list)
    cost: Cost | None = None  # a dataset's; a group's members each have theirs

    @property
    def done(self) -> bool:
        return self.status == "done"

    @property
    def is_group(self) -> bool:
        return bool(self.members)

    @property
    def delta(self) -> float | None:
        """Displayed mIoU minus the published number, in points."""
        if self.miou is None or self.published_miou is None:
            return None
        return round(pct(self.miou) - self.published_miou, 2)


@dataclass
class Mean:
    """A plain mean over entries, with the count that makes it honest."""

    miou: float | None  # fraction
    biou: float | None
    n_done: int
    n_total: int
    n_biou: int
    missing: list[str]  # titles of entries not in the mean

    @property
    def complete(self) -> bool:
        return self.n_done == self.n_total

    @property
    def entries_text(self) -> str:
        return f"{self.n_done}/{self.n_total}"


@dataclass
class Summary:
    run_dir: Path
    run_name: str
    suite: str | None
    method: str | None
    random_weights: bool
    limit: int | None
    entries: list[Entry]
    mean: Mean
    domains: dict[str, Mean]
    published_mean: float | None  # percent; only when every entry has a published number

    @property
    def label(self) -> str:
        return self.method or self.run_name


def _group_title(group: str, members: Sequence[DatasetResult]) -> str:
    """'PAXRay-4 (lungs)', 'PAXRay-4 (bones)' -> 'PAXRay-4'; otherwise the group id."""
    heads = {m.title.split(" (")[0].strip() for m in members}
    return heads.pop() if len(heads) == 1 and all(" (" in m.title for m in members) else group


def _group_entry(group: str, members: list[DatasetResult]) -> Entry:
    domains = {m.domain for m in members}
    not_done = [m for m in members if not m.done]
    if not_done:
        status = "failed" if any(m.status == "failed" for m in not_done) else "missing"
        parts = [f"{m.name} {m.status}" + (f" ({_reason(m)})" if m.reason else "") for m in not_done]
        reason = f"{len(not_done)} of {len(members)} members not done: " + "; ".join(parts)
        miou = biou = None
    else:
        status, reason = "done", None
        miou = mean_of(m.miou for m in members)
        biou = mean_of(m.biou for m in members) if all(m.biou is not None for m in members) else None
    published = [m.published_miou for m in members]
    images = [m.num_images for m in members]
    return Entry(
        name=group,
        title=_group_title(group, members),
        domain=domains.pop() if len(domains) == 1 else None,
        status="incomplete" if not_done and len(not_done) < len(members) else status,
        reason=reason,
        miou=miou,
        biou=biou,
        num_images=max(images) if all(i is not None for i in images) else None,  # same images per task
        published_miou=round(mean_of(published), 2) if all(p is not None for p in published) else None,
        published_source=next((m.published_source for m in members if m.published_source), None),
        members=members,
    )


def _reason(r: DatasetResult) -> str | None:
    """The reason, naming the file it is about when the reason does not already."""
    if r.reason and r.file and r.file not in r.reason:
        return f"{r.reason} (file: {r.file})"
    return r.reason


def _entries(run: RunResults) -> list[Entry]:
    entries, seen_groups = [], set()
    for name in run.order:
        r = run.datasets[name]
        if r.group:
            if r.group in seen_groups:
                continue
            seen_groups.add(r.group)
            members = [run.datasets[n] for n in run.order if run.datasets[n].group == r.group]
            entries.append(_group_entry(r.group, members))
        else:
            entries.append(Entry(r.name, r.title, r.domain, r.status, _reason(r), r.miou, r.biou, r.num_images,
                                 r.published_miou, r.published_source, cost=r.cost))
    return entries


def _mean_over(entries: Sequence[Entry]) -> Mean:
    done = [e for e in entries if e.done]
    with_biou = [e.biou for e in done if e.biou is not None]
    return Mean(
        miou=mean_of(e.miou for e in done),
        biou=mean_of(with_biou),
        n_done=len(done),
        n_total=len(entries),
        n_biou=len(with_biou),
        missing=[e.title for e in entries if not e.done],
    )


def summarize(run: RunResults) -> Summary:
    """Entries in suite order, the suite mean and per-domain means (see the module docstring)."""
    entries = _entries(run)
    domains: dict[str, list[Entry]] = {}
    for e in entries:
        if e.domain:
            domains.setdefault(e.domain, []).append(e)
    published = [e.published_miou for e in entries]
    return Summary(
        run_dir=run.run_dir,
        run_name=run.name,
        suite=run.suite,
        method=run.method,
        random_weights=run.random_weights,
        limit=run.limit,
        entries=entries,
        mean=_mean_over(entries),
        domains={d: _mean_over(es) for d, es in domains.items()},
        published_mean=mean_of(published) if entries and all(p is not None for p in published) else None,
    )
