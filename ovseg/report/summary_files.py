"""`summary.md` and `summary.csv`: what a user reads and what a spreadsheet loads from a run folder."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Iterable, Sequence

from ovseg import atomic
from ovseg.evaluation.rundir import COST_FIELDS, Cost

from .numbers import fmt, pct
from .results import load_run
from .summary import Mean, Summary, summarize

RANDOM_WEIGHTS_LINE = "random weights — smoke test, not a result"


def _warnings(summary: Summary) -> list[str]:
    lines = []
    if summary.random_weights:
        lines.append(f"> **⚠ {RANDOM_WEIGHTS_LINE}.** The models ran with random weights.")
    if summary.limit is not None:
        lines.append(f"> **⚠ limited to the first {summary.limit} images per dataset** — not comparable with "
                     "published numbers.")
    return lines


def _mean_sentence(mean: Mean, what: str = "Mean") -> str:
    miou = fmt(pct(mean.miou)) or "n/a"
    if mean.complete:
        text = f"**{what} mIoU: {miou}** over all {mean.n_total} entries"
    else:
        text = (f"**{what} mIoU: {miou} — over {mean.n_done} of {mean.n_total} entries only** "
                f"(not in the mean: {', '.join(mean.missing)}); not comparable with a full-suite mean")
    if mean.n_biou:
        biou_count = "" if mean.n_biou == mean.n_total else f" (over {mean.n_biou} of {mean.n_total} entries)"
        text += f" · mean Boundary IoU: {fmt(pct(mean.biou))}{biou_count}"
    return text + "."


def summary_markdown(s: Summary) -> str:
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
                         fmt(pct(e.miou)), fmt(pct(e.biou)), fmt(e.published_miou),
                         fmt(e.delta, signed=True), e.status))
        for m in e.members:
            lines.append(row("", f"↳ {m.title}", m.domain, m.num_images if m.num_images is not None else "",
                             fmt(pct(m.miou)), fmt(pct(m.biou)), fmt(m.published_miou), "",
                             f"{m.status} (in {e.title})"))
    mean_title = "**Mean**" if s.mean.complete else f"**Mean ({s.mean.n_done} of {s.mean.n_total})**"
    lines.append(row("", mean_title, "", "", f"**{fmt(pct(s.mean.miou))}**", fmt(pct(s.mean.biou)),
                     fmt(s.published_mean), "", s.mean.entries_text))

    if s.domains:
        lines += ["", "## Per-domain means", "",
                  "Plain mean of each domain's entries (the suite mean is over entries, not over domains).", "",
                  "| Domain | mIoU | Boundary IoU | Entries |", "|---|---|---|---|"]
        for d, m in s.domains.items():
            note = "" if m.complete else f" (not in it: {', '.join(m.missing)})"
            lines.append(f"| {d} | {fmt(pct(m.miou))} | {fmt(pct(m.biou))} | {m.n_done} of {m.n_total}{note} |")

    not_done = [e for e in s.entries if not e.done]
    if not_done:
        lines += ["", "## Not in the means", ""]
        lines += [f"- **{e.title}** (`{e.name}`): {e.status} — {e.reason or 'no reason given'}" for e in not_done]
    lines += _cost_section(s)
    sources = sorted({e.published_source for e in s.entries if e.published_source})
    if sources:
        lines += ["", "Published numbers: " + "; ".join(sources)]
    lines += ["", "mIoU and Boundary IoU in percent, rounded like mmseg (`np.round(x * 100, 2)`); means are taken "
              "over unrounded values. summary.csv has the unrounded fractions."]
    return "\n".join(lines) + "\n"


COST_COLUMNS = ["data s/image", "model s/image", "refiner s/image", "total s/image", "peak RSS (MB)",
                "peak GPU (MB)"]


def _cost_cells(cost: Cost | None) -> list[float | None]:
    if cost is None:
        return [None] * len(COST_FIELDS)
    return [getattr(cost, k) for k in COST_FIELDS]


def results_table(s: Summary) -> tuple[list[str], list[list[Any]]]:
    """One row per dataset (group members included): status, numbers in percent and cost (a W&B table)."""
    columns = ["dataset", "title", "status", "images", "mIoU", "Boundary IoU", *COST_COLUMNS]
    rows = []
    for e in s.entries:
        for r in e.members or [e]:
            rows.append([r.name, r.title, r.status, r.num_images, pct(r.miou), pct(r.biou), *_cost_cells(r.cost)])
    return columns, rows


def _cost_section(s: Summary) -> list[str]:
    columns, rows = results_table(s)
    rows = [r for r in rows if any(v is not None for v in r[6:])]
    if not rows:
        return []

    def num(v, digits):
        return "" if v is None else f"{v:.{digits}f}"

    lines = ["", "## Cost", "",
             "Seconds per image one process spends (summed over processes, divided by the images) and the peak "
             "memory of the busiest process; GPU is blank when the models ran on the CPU.", "",
             "| Dataset | Images | " + " | ".join(COST_COLUMNS) + " |", "|" + "---|" * (2 + len(COST_COLUMNS))]
    for r in rows:
        cells = [num(v, 3) for v in r[6:10]] + [num(v, 0) for v in r[10:]]
        lines.append(f"| {r[1]} | {'' if r[3] is None else r[3]} | " + " | ".join(cells) + " |")
    return lines


CSV_COLUMNS = ["kind", "dataset", "title", "domain", "group", "status", "num_images", "miou", "biou",
               "published_miou", "delta_miou", "miou_fraction", "biou_fraction", "entries", "reason", *COST_FIELDS]


def summary_rows(s: Summary) -> list[dict[str, Any]]:
    rows = []
    for e in s.entries:
        rows.append({"kind": "group" if e.is_group else "dataset", "dataset": e.name, "title": e.title,
                     "domain": e.domain, "group": e.name if e.is_group else None, "status": e.status,
                     "num_images": e.num_images, "miou": pct(e.miou), "biou": pct(e.biou),
                     "published_miou": e.published_miou, "delta_miou": e.delta, "miou_fraction": e.miou,
                     "biou_fraction": e.biou, "entries": None, "reason": e.reason,
                     **dict(zip(COST_FIELDS, _cost_cells(e.cost)))})
        for m in e.members:
            rows.append({"kind": "member", "dataset": m.name, "title": m.title, "domain": m.domain, "group": e.name,
                         "status": m.status, "num_images": m.num_images, "miou": pct(m.miou), "biou": pct(m.biou),
                         "published_miou": m.published_miou, "delta_miou": None, "miou_fraction": m.miou,
                         "biou_fraction": m.biou, "entries": None, "reason": m.reason,
                         **dict(zip(COST_FIELDS, _cost_cells(m.cost)))})
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


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in columns})
    atomic.write_text(path, out.getvalue())


def write_summary(run_dir: str | Path) -> Summary:
    """Summarise a run folder and write `summary.csv` and `summary.md` into it."""
    summary = summarize(load_run(run_dir))
    run_dir = Path(run_dir)
    write_csv(run_dir / "summary.csv", CSV_COLUMNS, summary_rows(summary))
    atomic.write_text(run_dir / "summary.md", summary_markdown(summary))
    return summary
