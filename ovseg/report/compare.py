"""Comparing runs: side-by-side Markdown and CSV tables, a grouped bar chart, and the W&B table."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from ovseg.errors import OvsegError
from ovseg import atomic

from .numbers import fmt, mean_of, pct
from .results import load_run
from .summary import Entry, Summary, summarize
from .summary_files import RANDOM_WEIGHTS_LINE, write_csv


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
    columns += ["mean mIoU", "mean Boundary IoU", "entries", "mean total s/image", "max peak RSS (MB)",
                "max peak GPU (MB)"]
    rows = []
    for label, s in zip(labels, summaries):
        found = _by_name(s)
        values = [pct(found[n].miou) if n in found else None for n, _ in entries]
        rows.append([label, s.method, s.suite, s.random_weights, *values, pct(s.mean.miou), pct(s.mean.biou),
                     s.mean.entries_text, *_run_cost(s)])
    return columns, rows


def _run_cost(s: Summary) -> list[float | None]:
    """A run's cost at a glance: mean total seconds per image over its datasets, and its peak memory."""
    costs = [r.cost for e in s.entries for r in (e.members or [e]) if r.cost is not None]
    total = mean_of(c.total_s_per_image for c in costs if c.total_s_per_image is not None)
    rss = [c.peak_rss_mb for c in costs if c.peak_rss_mb is not None]
    gpu = [c.peak_gpu_mb for c in costs if c.peak_gpu_mb is not None]
    return [None if total is None else round(total, 4), max(rss, default=None), max(gpu, default=None)]


def _common_mean(summaries: Sequence[Summary], names: Sequence[str]) -> tuple[list[str], list[float | None]]:
    """Entries every run finished, and each run's mean over exactly those (comparable by construction)."""
    maps = [_by_name(s) for s in summaries]
    common = [n for n in names if all(n in m and m[n].done for m in maps)]
    return common, [mean_of(m[n].miou for n in common) for m in maps]


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
    atomic.write_text(paths["markdown"], _comparison_markdown(summaries, labels, entries, maps, common, common_means))
    _write_comparison_csv(paths["csv"], summaries, labels, entries, maps, common_means)
    _bar_chart(paths["chart"], summaries)
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
            cells = [title, fmt(values[0])]
            for v in values[1:]:
                cells += [fmt(v), fmt(_delta(v, values[0]), signed=True)]
            lines.append("| " + " | ".join(cells) + " |")
        own = [pct(getattr(s.mean, metric)) for s in summaries]
        cells = ["**Mean (own entries)**", f"{fmt(own[0])} ({summaries[0].mean.entries_text})"]
        for v, s in zip(own[1:], summaries[1:]):
            cells += [f"{fmt(v)} ({s.mean.entries_text})", ""]
        lines.append("| " + " | ".join(cells) + " |")
        if metric == "miou" and len(summaries) > 1:
            cm = [pct(v) for v in common_means]
            cells = [f"**Mean over the {len(common)} common entries**", fmt(cm[0])]
            for v in cm[1:]:
                cells += [fmt(v), fmt(_delta(v, cm[0]), signed=True)]
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
    write_csv(path, columns, rows)


def _bar_chart(path, summaries: Sequence[Summary]) -> None:
    fig = bar_figure(summaries)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def bar_figure(summaries: Sequence[Summary]):
    """Grouped bars: one group per entry (+ the common mean), one bar per run; no bar where no result.

    The legend is built from one swatch per run, so a run without a result for the first entry (whose
    first bar is hidden) keeps its swatch."""
    labels, entries, maps = run_labels(summaries), _union_entries(summaries), [_by_name(s) for s in summaries]
    common, common_means = _common_mean(summaries, [n for n, _ in entries])
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # object API: never touches pyplot's global backend
    from matplotlib.patches import Patch

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
    colours = [f"C{i % 10}" for i in range(n_runs)]
    for i, (label, s, row) in enumerate(zip(labels, summaries, values)):
        heights = np.array([np.nan if v is None else v for v in row], dtype=float)
        bars = ax.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(heights, nan=0.0), width, color=colours[i])
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
    handles = [Patch(facecolor=c, label=f"{label} (random weights)" if s.random_weights else label)
               for c, label, s in zip(colours, labels, summaries)]
    ax.legend(handles=handles, fontsize=8)
    fig.tight_layout()
    return fig
