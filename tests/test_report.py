"""Results aggregation on hand-written run folders: the numbers are computed by hand here.

The run folders are written the way `ovseg bench` writes them (config.yaml + datasets/<name>.json),
so these tests pin the aggregation rules, not the engine.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import yaml

from ovseg.errors import OvsegError
from ovseg.report import (
    RANDOM_WEIGHTS_LINE,
    compare_runs,
    comparison_table,
    load_run,
    pct,
    summarize,
    summary_markdown,
    write_summary,
)

SUITES = Path(__file__).resolve().parent.parent / "configs" / "suites"

# MESS leaderboard, CAT-Seg-B, in MESS order (PAXRay-4 as one value): must give 33.74 overall and
# General 34.96, Earth Monitoring 34.57, Medical Sciences 41.65, Engineering 26.26, Agri & Bio 29.32.
CATSEG_B = [44.58, 27.36, 20.79, 21.54, 33.08, 62.42, 15.75, 41.89, 39.47, 35.12, 40.62, 70.68, 25.38, 25.63,
            44.94, 13.76, 49.14, 21.32, 20.83, 39.1, 3.4, 45.47]


def write_run(root: Path, datasets: list[dict], *, suite="standard8", method="lposs_plus", order=None,
              random_weights=False, limit=None, config=True) -> Path:
    """A run folder: `datasets` are JSON records (missing keys filled like the engine does)."""
    run = root
    (run / "datasets").mkdir(parents=True, exist_ok=True)
    names = order if order is not None else [d["dataset"] for d in datasets]
    if config:  # with the suite entries `ovseg bench` stores (from the shipped suite file when there is one)
        shipped = SUITES / f"{suite}.yaml"
        known = {d["name"]: d for d in yaml.safe_load(shipped.read_text())["datasets"]} if shipped.is_file() else {}
        given = {d["dataset"]: d for d in datasets}
        entries = [{"name": n, "title": known.get(n, given.get(n, {})).get("title") or n,
                    "domain": known.get(n, given.get(n, {})).get("domain"),
                    "group": known.get(n, given.get(n, {})).get("group")} for n in names]
        doc = {"method": {"name": method}, "suite": {"name": suite, "datasets": names, "entries": entries},
               "random_weights": random_weights, "limit": limit}
        (run / "config.yaml").write_text(yaml.safe_dump(doc))
    for d in datasets:
        record = {"title": d["dataset"], "suite": suite, "domain": None, "group": None, "method": method,
                  "status": "done", "reason": None, "num_images": 10, "random_weights": random_weights,
                  "elapsed_s": 1.0, "protocol": {}, "published": {"miou": None, "source": None}, **d}
        if record["status"] == "done":
            record.setdefault("miou", 0.5)
            record.setdefault("biou", 0.25)
        (run / "datasets" / f"{d['dataset']}.json").write_text(json.dumps(record))
    return run


def mess_run(root: Path, values: dict[str, float], **kw) -> Path:
    """A mess22 run from the real suite YAML; `values` maps dataset name to mIoU (fraction)."""
    suite = yaml.safe_load((SUITES / "mess22.yaml").read_text())
    records = [{"dataset": d["name"], "title": d["title"], "domain": d.get("domain"), "group": d.get("group"),
                "miou": values[d["name"]], "biou": values[d["name"]] / 2}
               for d in suite["datasets"] if d["name"] in values]
    return write_run(root, records, suite="mess22", order=[d["name"] for d in suite["datasets"]], **kw)


def catseg_values() -> dict[str, float]:
    names = [d["name"] for d in yaml.safe_load((SUITES / "mess22.yaml").read_text())["datasets"]]
    plain = [n for n in names if not n.startswith("paxray_")]
    values = dict(zip(plain, [v / 100 for v in CATSEG_B[:14] + CATSEG_B[15:]]))
    # four tasks whose mean is 44.94
    values.update(paxray_lungs=0.60, paxray_mediastinum=0.40, paxray_bones=0.30, paxray_diaphragm=0.4976)
    return values


def test_pct_rounds_like_mmseg():
    np = pytest.importorskip("numpy")
    assert pct(0.3304695653) == 33.05 and pct(0.2778015027) == 27.78 and pct(None) is None
    rng = random.Random(0)
    for x in [rng.random() for _ in range(2000)] + [0.0, 1.0, 0.12345, 0.5, 0.00005]:
        assert pct(x) == float(np.round(x * 100, 2)), x


def test_mess_aggregation_reproduces_the_leaderboard(tmp_path):
    s = summarize(load_run(mess_run(tmp_path / "run", catseg_values())))
    assert len(s.entries) == 22 and s.mean.complete
    pax = next(e for e in s.entries if e.name == "paxray4")
    assert pax.title == "PAXRay-4" and len(pax.members) == 4 and pax.domain == "Medical Sciences"
    assert pax.miou == pytest.approx(0.4494)
    assert pct(s.mean.miou) == 33.74
    expected = {"General": 34.96, "Earth Monitoring": 34.57, "Medical Sciences": 41.65, "Engineering": 26.26,
                "Agriculture and Biology": 29.32}
    assert list(s.domains) == list(expected)
    for domain, value in expected.items():  # leaderboard rounds unrounded inputs: allow the last digit
        assert pct(s.domains[domain].miou) == pytest.approx(value, abs=0.011), domain
    # the suite mean is over entries, not the mean of the domain means (33.35 for this row)
    assert pct(sum(m.miou for m in s.domains.values()) / 5) == pytest.approx(33.35, abs=0.011)


def test_means_match_hand_computation(tmp_path):
    run = write_run(tmp_path / "run", [
        {"dataset": "a", "domain": "D1", "miou": 0.10, "biou": 0.05},
        {"dataset": "t1", "title": "Tasks (one)", "domain": "D2", "group": "tasks", "miou": 0.20, "biou": 0.10},
        {"dataset": "b", "domain": "D1", "miou": 0.40, "biou": 0.20},
        {"dataset": "t2", "title": "Tasks (two)", "domain": "D2", "group": "tasks", "miou": 0.60, "biou": 0.30},
        {"dataset": "c", "domain": "D2", "miou": 0.70, "biou": None},
    ], suite="custom")
    s = summarize(load_run(run))
    assert [e.name for e in s.entries] == ["a", "tasks", "b", "c"]  # the group sits where its first member is
    assert s.entries[1].title == "Tasks" and s.entries[1].miou == pytest.approx(0.40)
    assert s.entries[1].biou == pytest.approx(0.20)
    assert s.mean.miou == pytest.approx((0.10 + 0.40 + 0.40 + 0.70) / 4)
    assert s.mean.biou == pytest.approx((0.05 + 0.20 + 0.20) / 3) and s.mean.n_biou == 3
    assert s.domains["D1"].miou == pytest.approx(0.25)
    assert s.domains["D2"].miou == pytest.approx((0.40 + 0.70) / 2) and s.domains["D2"].n_total == 2


def test_missing_and_failed_entries_are_reported_not_dropped(tmp_path):
    values = catseg_values()
    del values["dram"], values["paxray_bones"]  # no result files at all
    run = mess_run(tmp_path / "run", values)
    (run / "datasets" / "cwfid.json").write_text(json.dumps(
        {"dataset": "cwfid", "title": "CWFID", "status": "failed", "reason": "CUDA out of memory",
         "domain": "Agriculture and Biology"}))
    (run / "datasets" / "suim.json").write_text("{ half a file")
    s = summarize(load_run(run))
    status = {e.name: e.status for e in s.entries}
    assert status["dram"] == "missing" and status["cwfid"] == "failed" and status["suim"] == "failed"
    pax = next(e for e in s.entries if e.name == "paxray4")
    # the suite YAML says paxray_bones belongs to paxray4: the group is not averaged over 3 tasks
    assert pax.status == "incomplete" and pax.miou is None and "paxray_bones" in pax.reason
    assert s.mean.n_done == 18 and s.mean.n_total == 22 and not s.mean.complete
    assert set(s.mean.missing) == {"DRAM", "PAXRay-4", "SUIM", "CWFID"}
    done = [e.miou for e in s.entries if e.done]
    assert s.mean.miou == pytest.approx(sum(done) / 18)
    assert s.domains["Agriculture and Biology"].n_done == 1

    md = summary_markdown(write_summary(run))
    assert "over 18 of 22 entries only" in md and "not comparable" in md
    assert "CUDA out of memory" in md and "unreadable result file" in md and "no result file" in md
    assert "paxray_bones missing" in md


def test_summary_files_a_user_reads(tmp_path):
    run = write_run(tmp_path / "run", [
        {"dataset": "voc21", "title": "PASCAL VOC 2012 (21)", "miou": 0.61104, "biou": 0.3214,
         "published": {"miou": 61.1, "source": "LPOSS paper, Table 1"}, "num_images": 1449},
        {"dataset": "voc20", "title": "PASCAL VOC 2012 (20, no background)", "miou": 0.7712, "biou": 0.5,
         "published": {"miou": 78.8, "source": "LPOSS paper, Table 1"}},
        {"dataset": "ade20k", "title": "ADE20K (150)", "status": "missing", "reason": "folder not found: /data/ade"},
    ], random_weights=True)
    s = write_summary(run)
    md = (run / "summary.md").read_text()
    assert md.startswith("# lposs_plus on standard8")
    assert RANDOM_WEIGHTS_LINE in md
    assert "| 1 | PASCAL VOC 2012 (21) | 1449 | 61.10 | 32.14 | 61.10 | +0.00 | done |" in md
    assert "| 77.12 | 50.00 | 78.80 | -1.68 | done |" in md
    assert "**Mean mIoU: 69.11 — over 2 of 3 entries only** (not in the mean: ADE20K (150))" in md
    assert "folder not found: /data/ade" in md and "LPOSS paper, Table 1" in md
    assert s.published_mean is None  # ade20k has no published number: no published suite mean

    rows = list(csv.DictReader(open(run / "summary.csv")))
    by_kind = {r["kind"]: r for r in rows}
    assert [r["dataset"] for r in rows if r["kind"] == "dataset"] == ["voc21", "voc20", "ade20k"]
    assert by_kind["mean"]["miou"] == "69.11" and by_kind["mean"]["entries"] == "2/3"
    assert float(by_kind["mean"]["miou_fraction"]) == pytest.approx((0.61104 + 0.7712) / 2)
    assert by_kind["mean"]["status"] == "incomplete" and "ADE20K" in by_kind["mean"]["reason"]


def test_limit_and_missing_config_are_handled(tmp_path):
    run = write_run(tmp_path / "run", [{"dataset": "voc21", "miou": 0.5, "limit": 3}], config=False)
    s = summarize(load_run(run))
    assert s.method == "lposs_plus" and s.suite == "standard8" and s.limit == 3 and s.mean.complete
    assert "limited to the first 3 images" in summary_markdown(s)


def test_load_run_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(OvsegError, match="does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OvsegError, match="not a run folder"):
        load_run(tmp_path / "empty")


def test_comparison_table_is_method_by_dataset(tmp_path):
    a = write_run(tmp_path / "a", [{"dataset": "voc21", "miou": 0.6}, {"dataset": "voc20", "miou": 0.8}])
    b = write_run(tmp_path / "b", [{"dataset": "voc21", "miou": 0.5}], method="sclip")
    columns, rows = comparison_table([summarize(load_run(a)), summarize(load_run(b))])
    assert columns[:4] == ["run", "method", "suite", "random_weights"] and columns[4:6] == [
        "PASCAL VOC 2012 (21)", "PASCAL VOC 2012 (20, no background)"]  # titles from the suite YAML
    assert rows[0][:6] == ["lposs_plus", "lposs_plus", "standard8", False, 60.0, 80.0]
    assert rows[1][:6] == ["sclip", "sclip", "standard8", False, 50.0, None]
    assert rows[1][columns.index("entries")] == "1/1" and len(rows[0]) == len(columns)


def test_compare_runs_writes_tables_and_chart(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    pytest.importorskip("matplotlib")
    first = write_run(tmp_path / "runs" / "baseline", [
        {"dataset": "voc21", "miou": 0.60}, {"dataset": "voc20", "miou": 0.80}, {"dataset": "ade20k", "miou": 0.20}])
    second = write_run(tmp_path / "runs" / "tuned", [  # same method name, other datasets
        {"dataset": "voc21", "miou": 0.62}, {"dataset": "cityscapes", "miou": 0.37},
        {"dataset": "ade20k", "status": "failed", "reason": "boom"}], random_weights=True)
    paths = compare_runs([first, second], tmp_path / "cmp")
    assert set(paths) == {"markdown", "csv", "chart"} and all(p.exists() for p in paths.values())

    md = paths["markdown"].read_text()
    assert "| Dataset | baseline | tuned | Δ tuned |" in md  # method names clash: folder names label
    assert "| PASCAL VOC 2012 (21) | 60.00 | 62.00 | +2.00 |" in md
    assert "| PASCAL VOC 2012 (20, no background) | 80.00 |  |  |" in md
    assert "| Cityscapes (19) |  | 37.00 |  |" in md
    assert "| ADE20K (150) | 20.00 |  |  |" in md  # failed in the second run: blank, not 0
    assert "Mean over the 1 common entries" in md and RANDOM_WEIGHTS_LINE in md

    rows = {r["dataset"] or r["title"]: r for r in csv.DictReader(open(paths["csv"]))}
    assert rows["voc21"]["delta_miou:tuned"] == "2.0" and rows["voc20"]["miou:tuned"] == ""
    assert rows["mean (common entries)"]["miou:baseline"] == "60.0"
    assert float(rows["mean (own entries)"]["miou:baseline"]) == pytest.approx(53.33)

    with Image.open(paths["chart"]) as im:
        assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 400


def test_compare_labels_stay_unique_when_folder_names_clash(tmp_path):
    a = write_run(tmp_path / "x" / "run", [{"dataset": "voc21", "miou": 0.6}])
    b = write_run(tmp_path / "y" / "run", [{"dataset": "voc21", "miou": 0.5}])
    columns, rows = comparison_table([summarize(load_run(a)), summarize(load_run(b))])
    assert [r[0] for r in rows] == ["run #1", "run #2"]
