"""Results aggregation: run folders to summary tables, run comparisons and a bar chart.

The numbers users quote come from here, so the rules are explicit (and tested):

- datasets sharing a `group` (PAXRay-4's 4 binary tasks) are averaged into one entry first, as MESS
  does; a group counts only when every member finished;
- the suite mean is the plain arithmetic mean over entries (MESS, the papers' "avg" columns), and a
  domain mean is the plain mean of that domain's entries (not a mean of means);
- a missing or failed entry is never dropped silently: every mean says over how many of how many
  entries it is and names what is not in it;
- percent values are shown like mmseg (`np.round(x * 100, 2)`); CSVs also keep the unrounded fraction.

Run folder (written by `ovseg.bench`): `config.yaml` and `datasets/<name>.json`; this module adds
`summary.csv` and `summary.md`. Only stdlib, PyYAML (via omegaconf) and, for the chart, matplotlib.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import OvsegError

STATUSES = ("done", "missing", "failed")
RANDOM_WEIGHTS_LINE = "random weights — smoke test, not a result"
NO_RESULT_FILE = "no result file (not run yet, interrupted, or left out with --datasets)"


# --------------------------------------------------------------------------------------------------
# numbers


def pct(fraction: float | None) -> float | None:
    """Fraction to percent rounded like mmseg's `np.round(x * 100, 2)` (rint is half-to-even)."""
    if fraction is None:
        return None
    return round(fraction * 100 * 100) / 100


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _num(value: Any) -> float | None:
    """A finite float or None (JSON null, NaN, strings and junk all become None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


# --------------------------------------------------------------------------------------------------
# loading


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
    from .paths import config_dir

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
    miou, biou = _num(raw.get("miou")), _num(raw.get("biou"))
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
        published_miou=_num(published.get("miou")),
        published_source=published.get("source"),
        random_weights=bool(raw.get("random_weights", False)),
        elapsed_s=_num(raw.get("elapsed_s")),
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


# --------------------------------------------------------------------------------------------------
# summarising


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

    def to_markdown(self) -> str:
        return _summary_markdown(self)

    def rows(self) -> list[dict[str, Any]]:
        return _summary_rows(self)


def _group_title(group: str, members: Sequence[DatasetResult]) -> str:
    """'PAXRay-4 (lungs)', 'PAXRay-4 (bones)' -> 'PAXRay-4'; otherwise the group id."""
    heads = {m.title.split(" (")[0].strip() for m in members}
    return heads.pop() if len(heads) == 1 and all(" (" in m.title for m in members) else group


def _group_entry(group: str, members: list[DatasetResult]) -> Entry:
    domains = {m.domain for m in members}
    not_done = [m for m in members if not m.done]
    if not_done:
        status = "failed" if any(m.status == "failed" for m in not_done) else "missing"
        parts = [f"{m.name} {m.status}" + (f" ({m.reason})" if m.reason else "") for m in not_done]
        reason = f"{len(not_done)} of {len(members)} members not done: " + "; ".join(parts)
        miou = biou = None
    else:
        status, reason = "done", None
        miou = _mean(m.miou for m in members)
        biou = _mean(m.biou for m in members) if all(m.biou is not None for m in members) else None
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
        published_miou=round(_mean(published), 2) if all(p is not None for p in published) else None,
        published_source=next((m.published_source for m in members if m.published_source), None),
        members=members,
    )


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
            entries.append(Entry(r.name, r.title, r.domain, r.status, r.reason, r.miou, r.biou, r.num_images,
                                 r.published_miou, r.published_source))
    return entries


def _mean_over(entries: Sequence[Entry]) -> Mean:
    done = [e for e in entries if e.done]
    with_biou = [e.biou for e in done if e.biou is not None]
    return Mean(
        miou=_mean(e.miou for e in done),
        biou=_mean(with_biou),
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
        published_mean=_mean(published) if entries and all(p is not None for p in published) else None,
    )


# --------------------------------------------------------------------------------------------------
# summary.md / summary.csv


def _warnings(summary: Summary) -> list[str]:
    lines = []
    if summary.random_weights:
        lines.append(f"> **⚠ {RANDOM_WEIGHTS_LINE}.** The models ran with random weights.")
    if summary.limit is not None:
        lines.append(f"> **⚠ limited to the first {summary.limit} images per dataset** — not comparable with "
                     "published numbers.")
    return lines


def _mean_sentence(mean: Mean, what: str = "Mean") -> str:
    miou = _fmt(pct(mean.miou)) or "n/a"
    if mean.complete:
        text = f"**{what} mIoU: {miou}** over all {mean.n_total} entries"
    else:
        text = (f"**{what} mIoU: {miou} — over {mean.n_done} of {mean.n_total} entries only** "
                f"(not in the mean: {', '.join(mean.missing)}); not comparable with a full-suite mean")
    if mean.n_biou:
        biou_count = "" if mean.n_biou == mean.n_total else f" (over {mean.n_biou} of {mean.n_total} entries)"
        text += f" · mean Boundary IoU: {_fmt(pct(mean.biou))}{biou_count}"
    return text + "."


def _summary_markdown(s: Summary) -> str:
    has_domain = any(e.domain for e in s.entries)
    has_published = any(e.published_miou is not None for e in s.entries)
    lines = [f"# {s.method or s.run_name} on {s.suite or 'unknown suite'}", ""]
    warnings = _warnings(s)
    if warnings:
        lines += warnings + [""]
    lines += [f"Run folder: `{s.run_dir}`", "", _mean_sentence(s.mean)]
    if s.published_mean is not None and s.mean.miou is not None:
        lines.append(f"Published mean mIoU: {s.published_mean:.2f} "
                     f"(Δ {pct(s.mean.miou) - s.published_mean:+.2f}{'' if s.mean.complete else ', over different entries'}).")
    lines.append("")

    header = ["#", "Dataset"] + (["Domain"] if has_domain else []) + ["Images", "mIoU", "Boundary IoU"]
    header += ["Published mIoU", "Δ mIoU"] if has_published else []
    header += ["Status"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(index, title, domain, images, miou, biou, published, delta, status):
        cells = [index, title] + ([domain or ""] if has_domain else []) + [images, miou, biou]
        cells += [published, delta] if has_published else []
        return "| " + " | ".join(str(c) for c in cells + [status]) + " |"

    for i, e in enumerate(s.entries, 1):
        title = f"{e.title} (mean of {len(e.members)})" if e.is_group else e.title
        lines.append(row(i, title, e.domain, e.num_images if e.num_images is not None else "",
                         _fmt(pct(e.miou)), _fmt(pct(e.biou)), _fmt(e.published_miou),
                         _fmt(e.delta, signed=True), e.status))
        for m in e.members:
            lines.append(row("", f"↳ {m.title}", m.domain, m.num_images if m.num_images is not None else "",
                             _fmt(pct(m.miou)), _fmt(pct(m.biou)), _fmt(m.published_miou), "",
                             f"{m.status} (in {e.title})"))
    mean_title = "**Mean**" if s.mean.complete else f"**Mean ({s.mean.n_done} of {s.mean.n_total})**"
    lines.append(row("", mean_title, "", "", f"**{_fmt(pct(s.mean.miou))}**", _fmt(pct(s.mean.biou)),
                     _fmt(s.published_mean), "", s.mean.entries_text))

    if s.domains:
        lines += ["", "## Per-domain means", "",
                  "Plain mean of each domain's entries (the suite mean is over entries, not over domains).", "",
                  "| Domain | mIoU | Boundary IoU | Entries |", "|---|---|---|---|"]
        for d, m in s.domains.items():
            note = "" if m.complete else f" (not in it: {', '.join(m.missing)})"
            lines.append(f"| {d} | {_fmt(pct(m.miou))} | {_fmt(pct(m.biou))} | {m.n_done} of {m.n_total}{note} |")

    not_done = [e for e in s.entries if not e.done]
    if not_done:
        lines += ["", "## Not in the means", ""]
        lines += [f"- **{e.title}** (`{e.name}`): {e.status} — {e.reason or 'no reason given'}" for e in not_done]
    sources = sorted({e.published_source for e in s.entries if e.published_source})
    if sources:
        lines += ["", "Published numbers: " + "; ".join(sources)]
    lines += ["", "mIoU and Boundary IoU in percent, rounded like mmseg (`np.round(x * 100, 2)`); means are taken "
              "over unrounded values. summary.csv has the unrounded fractions."]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ["kind", "dataset", "title", "domain", "group", "status", "num_images", "miou", "biou",
               "published_miou", "delta_miou", "miou_fraction", "biou_fraction", "entries", "reason"]


def _summary_rows(s: Summary) -> list[dict[str, Any]]:
    rows = []
    for e in s.entries:
        rows.append({"kind": "group" if e.is_group else "dataset", "dataset": e.name, "title": e.title,
                     "domain": e.domain, "group": e.name if e.is_group else None, "status": e.status,
                     "num_images": e.num_images, "miou": pct(e.miou), "biou": pct(e.biou),
                     "published_miou": e.published_miou, "delta_miou": e.delta, "miou_fraction": e.miou,
                     "biou_fraction": e.biou, "entries": None, "reason": e.reason})
        for m in e.members:
            rows.append({"kind": "member", "dataset": m.name, "title": m.title, "domain": m.domain, "group": e.name,
                         "status": m.status, "num_images": m.num_images, "miou": pct(m.miou), "biou": pct(m.biou),
                         "published_miou": m.published_miou, "delta_miou": None, "miou_fraction": m.miou,
                         "biou_fraction": m.biou, "entries": None, "reason": m.reason})
    for d, m in s.domains.items():
        rows.append({"kind": "domain_mean", "dataset": None, "title": d, "domain": d, "miou": pct(m.miou),
                     "biou": pct(m.biou), "miou_fraction": m.miou, "biou_fraction": m.biou,
                     "entries": m.entries_text, "status": "complete" if m.complete else "incomplete",
                     "reason": None if m.complete else "not in the mean: " + ", ".join(m.missing)})
    m = s.mean
    rows.append({"kind": "mean", "dataset": None, "title": "Mean", "miou": pct(m.miou), "biou": pct(m.biou),
                 "published_miou": None if s.published_mean is None else round(s.published_mean, 2),
                 "miou_fraction": m.miou, "biou_fraction": m.biou, "entries": m.entries_text,
                 "status": "complete" if m.complete else "incomplete",
                 "reason": None if m.complete else "not in the mean: " + ", ".join(m.missing)})
    return rows


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in columns})


def write_summary(run_dir: str | Path) -> Summary:
    """Summarise a run folder and write `summary.csv` and `summary.md` into it."""
    summary = summarize(load_run(run_dir))
    run_dir = Path(run_dir)
    _write_csv(run_dir / "summary.csv", CSV_COLUMNS, summary.rows())
    (run_dir / "summary.md").write_text(summary.to_markdown())
    return summary


# --------------------------------------------------------------------------------------------------
# comparing runs


def run_labels(summaries: Sequence[Summary]) -> list[str]:
    """Method names, or run folder names where methods clash (then a number where those clash too)."""
    methods = Counter(s.label for s in summaries)
    labels = [s.label if methods[s.label] == 1 else s.run_name for s in summaries]
    counts, seen = Counter(labels), Counter()
    out = []
    for label in labels:
        seen[label] += 1
        out.append(label if counts[label] == 1 else f"{label} #{seen[label]}")
    return out


def _union_entries(summaries: Sequence[Summary]) -> list[tuple[str, str]]:
    """(name, title) of every entry of any run: the first run's order, then newcomers."""
    out: dict[str, str] = {}
    for s in summaries:
        for e in s.entries:
            out.setdefault(e.name, e.title)
    return list(out.items())


def _by_name(summary: Summary) -> dict[str, Entry]:
    return {e.name: e for e in summary.entries}


def comparison_table(summaries: Sequence[Summary]) -> tuple[list[str], list[list[Any]]]:
    """Method x dataset mIoU (percent) for a `wandb.Table`; None where a run lacks the entry."""
    labels = run_labels(summaries)
    entries = _union_entries(summaries)
    columns = ["run", "method", "suite", "random_weights"] + [title for _, title in entries]
    columns += ["mean mIoU", "mean Boundary IoU", "entries"]
    rows = []
    for label, s in zip(labels, summaries):
        found = _by_name(s)
        values = [pct(found[n].miou) if n in found else None for n, _ in entries]
        rows.append([label, s.method, s.suite, s.random_weights, *values, pct(s.mean.miou), pct(s.mean.biou),
                     s.mean.entries_text])
    return columns, rows


def _common_mean(summaries: Sequence[Summary], names: Sequence[str]) -> tuple[list[str], list[float | None]]:
    """Entries every run finished, and each run's mean over exactly those (comparable by construction)."""
    maps = [_by_name(s) for s in summaries]
    common = [n for n in names if all(n in m and m[n].done for m in maps)]
    return common, [_mean(m[n].miou for n in common) for m in maps]


def compare_runs(run_dirs: Sequence[str | Path], output_dir: str | Path) -> dict[str, Path]:
    """Side-by-side tables (Markdown, CSV) and a grouped bar chart (PNG) of several runs.

    Rows are entries (datasets, groups), columns are runs; deltas are against the first run. Runs
    with different dataset sets get blank cells; "common" means cover only entries all runs finished.
    """
    if not run_dirs:
        raise OvsegError("compare needs at least one run folder")
    summaries = [summarize(load_run(d)) for d in run_dirs]
    labels = run_labels(summaries)
    entries = _union_entries(summaries)
    maps = [_by_name(s) for s in summaries]
    common, common_means = _common_mean(summaries, [n for n, _ in entries])
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    paths = {
        "markdown": output_dir / "comparison.md",
        "csv": output_dir / "comparison.csv",
        "chart": output_dir / "comparison_miou.png",
    }
    paths["markdown"].write_text(_comparison_markdown(summaries, labels, entries, maps, common, common_means))
    _write_comparison_csv(paths["csv"], summaries, labels, entries, maps, common_means)
    _bar_chart(paths["chart"], summaries, labels, entries, maps, common, common_means)
    return paths


def _cell(entry: Entry | None, metric: str = "miou") -> float | None:
    return pct(getattr(entry, metric)) if entry is not None else None


def _delta(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else round(value - base, 2)


def _comparison_markdown(summaries, labels, entries, maps, common, common_means) -> str:
    lines = ["# Run comparison", ""]
    for label, s in zip(labels, summaries):
        notes = []
        if s.random_weights:
            notes.append(f"**⚠ {RANDOM_WEIGHTS_LINE}**")
        if s.limit is not None:
            notes.append(f"**⚠ limited to {s.limit} images per dataset**")
        if not s.mean.complete:
            notes.append(f"incomplete: {s.mean.n_done} of {s.mean.n_total} entries")
        extra = (" — " + "; ".join(notes)) if notes else ""
        lines.append(f"- **{label}**: method `{s.method}`, suite `{s.suite}`, run `{s.run_dir}`{extra}")
    lines.append("")
    for metric, name in (("miou", "mIoU"), ("biou", "Boundary IoU")):
        if metric == "biou" and not any(e.biou is not None for s in summaries for e in s.entries):
            continue
        lines += [f"## {name} (%)", ""]
        header = ["Dataset"] + [labels[0]]
        for label in labels[1:]:
            header += [label, f"Δ {label}"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for n, title in entries:
            values = [_cell(m.get(n), metric) for m in maps]
            cells = [title, _fmt(values[0])]
            for v in values[1:]:
                cells += [_fmt(v), _fmt(_delta(v, values[0]), signed=True)]
            lines.append("| " + " | ".join(cells) + " |")
        own = [pct(getattr(s.mean, metric)) for s in summaries]
        cells = ["**Mean (own entries)**", f"{_fmt(own[0])} ({summaries[0].mean.entries_text})"]
        for v, s in zip(own[1:], summaries[1:]):
            cells += [f"{_fmt(v)} ({s.mean.entries_text})", ""]
        lines.append("| " + " | ".join(cells) + " |")
        if metric == "miou" and len(summaries) > 1:
            cm = [pct(v) for v in common_means]
            cells = [f"**Mean over the {len(common)} common entries**", _fmt(cm[0])]
            for v in cm[1:]:
                cells += [_fmt(v), _fmt(_delta(v, cm[0]), signed=True)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Δ: points against the first run. Blank: the run has no finished result for that entry. "
                 "Only the common-entries mean compares runs over the same datasets.")
    return "\n".join(lines) + "\n"


def _write_comparison_csv(path, summaries, labels, entries, maps, common_means) -> None:
    columns = ["dataset", "title"]
    for i, label in enumerate(labels):
        columns += [f"miou:{label}", f"biou:{label}"] + ([f"delta_miou:{label}"] if i else [])
    rows = []
    for n, title in entries:
        row = {"dataset": n, "title": title}
        base = _cell(maps[0].get(n))
        for i, (label, m) in enumerate(zip(labels, maps)):
            v = _cell(m.get(n))
            row[f"miou:{label}"], row[f"biou:{label}"] = v, _cell(m.get(n), "biou")
            if i:
                row[f"delta_miou:{label}"] = _delta(v, base)
        rows.append(row)
    for title, values in (("mean (own entries)", [s.mean.miou for s in summaries]),
                          ("mean (common entries)", common_means)):
        row = {"dataset": None, "title": title}
        for i, (label, v) in enumerate(zip(labels, values)):
            row[f"miou:{label}"] = pct(v)
            if i:
                row[f"delta_miou:{label}"] = _delta(pct(v), pct(values[0]))
        rows.append(row)
    _write_csv(path, columns, rows)


def _bar_chart(path, summaries, labels, entries, maps, common, common_means) -> None:
    """Grouped bars: one group per entry (+ the common mean), one bar per run; no bar where no result."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # object API: never touches pyplot's global backend

    titles = [t for _, t in entries]
    values = [[_cell(m.get(n)) for n, _ in entries] for m in maps]
    if len(summaries) > 1 or not summaries[0].mean.complete:
        titles.append(f"Mean ({len(common)} common)")
    else:
        titles.append("Mean")
    for row, cm in zip(values, common_means):
        row.append(pct(cm))

    n_groups, n_runs = len(titles), len(summaries)
    width = 0.8 / n_runs
    fig = Figure(figsize=(min(4 + n_groups * (0.35 + 0.18 * n_runs), 40), 5.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(n_groups)
    annotate = n_groups * n_runs <= 40
    for i, (label, s, row) in enumerate(zip(labels, summaries, values)):
        heights = np.array([np.nan if v is None else v for v in row], dtype=float)
        legend = f"{label} (random weights)" if s.random_weights else label
        bars = ax.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(heights, nan=0.0), width, label=legend)
        for bar, h in zip(bars, heights):
            if np.isnan(h):  # no result: no bar, and a marker so the gap is not read as 0
                bar.set_visible(False)
                if annotate:
                    ax.annotate("n/a", (bar.get_x() + bar.get_width() / 2, 0), ha="center", va="bottom",
                                fontsize=7, color="0.35", xytext=(0, 2), textcoords="offset points")
            elif annotate:
                ax.annotate(f"{h:.1f}", (bar.get_x() + bar.get_width() / 2, h), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 1), textcoords="offset points")
    ax.axvline(n_groups - 1.5, color="0.6", linewidth=0.8, linestyle="--")
    ax.set_xticks(x)
    ax.set_xticklabels(titles, rotation=40 if n_groups > 6 else 0, ha="right" if n_groups > 6 else "center",
                       fontsize=8)
    ax.set_ylabel("mIoU (%)")
    suites = sorted({s.suite or "?" for s in summaries})
    ax.set_title(f"mIoU per dataset — {', '.join(suites)}")
    top = max([v for row in values for v in row if v is not None] or [1.0])
    ax.set_ylim(0, min(100.0, top * 1.15 + 1))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
