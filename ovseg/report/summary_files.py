"""`summary.md` and `summary.csv`: what a user reads and what a spreadsheet loads from a run folder."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterable, Sequence

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
    sources = sorted({e.published_source for e in s.entries if e.published_source})
    if sources:
        lines += ["", "Published numbers: " + "; ".join(sources)]
    lines += ["", "mIoU and Boundary IoU in percent, rounded like mmseg (`np.round(x * 100, 2)`); means are taken "
              "over unrounded values. summary.csv has the unrounded fractions."]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ["kind", "dataset", "title", "domain", "group", "status", "num_images", "miou", "biou",
               "published_miou", "delta_miou", "miou_fraction", "biou_fraction", "entries", "reason"]


def summary_rows(s: Summary) -> list[dict[str, Any]]:
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


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in columns})


def write_summary(run_dir: str | Path) -> Summary:
    """Summarise a run folder and write `summary.csv` and `summary.md` into it."""
    summary = summarize(load_run(run_dir))
    run_dir = Path(run_dir)
    write_csv(run_dir / "summary.csv", CSV_COLUMNS, summary_rows(summary))
    (run_dir / "summary.md").write_text(summary_markdown(summary))
    return summary
