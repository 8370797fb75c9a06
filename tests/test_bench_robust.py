"""Long runs that survive, tried from the command line on tiny random models and generated suites:
per-dataset failures, up-front checks, one writer per run folder, one run-folder schema, cost,
pictures and W&B without a network. (Signals and DDP: test_bench_processes.py.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ovseg.cli.main import main
from ovseg.evaluation.runlock import LOCK, RunLock

from .test_bench import _results, _suite, _write_dataset


def fast_method(folder: Path, refiner: str = "pamr", extra: str = "") -> str:
    """The tiny random MaskCLIP with a cheap refiner and small windows: about a second per dataset."""
    path = folder / "fast.yaml"
    path.write_text(
        "name: fast\n"
        "description: tiny random MaskCLIP, for tests\n"
        "predictor: {name: maskclip, model: ovseg-tiny-vit, pretrained: random, templates: single}\n"
        f"refiner: {{name: {refiner}}}\n"
        "protocol: {short_side: 64, crop: 48, stride: 32}\n" + extra
    )
    return str(path)


def bench_args(tmp_path: Path, names: list[str], run: Path | None = None, n: int = 2, **suite_kw) -> list[str]:
    """A generated suite of `names` (n images each, data under tmp_path/data) and the bench arguments."""
    data = tmp_path / "data"
    for i, name in enumerate(names):
        if not (data / name).exists():
            _write_dataset(data / name, n, i)
    suite = _suite(tmp_path / "mini.yaml", names)
    return ["bench", "--suite", str(suite), "--data-root", str(data), "--output", str(run or tmp_path / "run"),
            "--method", fast_method(tmp_path), "--accelerator", "cpu", "--no-progress"]


def truncate(path: Path, keep: int = 200) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def strict_json(path: Path) -> dict:
    """JSON as the standard has it: NaN and Infinity are refused."""
    def refuse(name):
        raise ValueError(f"{name} in {path}")
    return json.loads(path.read_text(), parse_constant=refuse)


# ---------------------------------------------------------------- failures are per dataset
def test_a_malformed_dataset_fails_alone_and_the_bench_goes_on(tmp_path, capsys):
    args = bench_args(tmp_path, ["a", "b", "c", "gone"])
    truncate(tmp_path / "data" / "b" / "img" / "s1.jpg")
    (tmp_path / "data" / "gone").rename(tmp_path / "data" / "elsewhere")
    assert main(args) == 1
    out, err = capsys.readouterr()
    run = tmp_path / "run"
    results = {name: strict_json(run / "datasets" / f"{name}.json") for name in ("a", "b", "c", "gone")}
    assert [results[n]["status"] for n in ("a", "b", "c", "gone")] == ["done", "failed", "done", "missing"]
    b = results["b"]
    assert b["file"].endswith("b/img/s1.jpg") and b["reason"].startswith("malformed:")
    assert "unreadable image" in b["reason"] and b["miou"] is None
    assert "b: malformed" in out and "gone: missing" in out
    assert "b failed" in err and "s1.jpg" in err
    summary = (run / "summary.md").read_text()
    assert "over 2 of 4 entries only" in summary
    assert "- **b** (`b`): failed — malformed:" in summary and "s1.jpg" in summary

    # `data check` calls the same datasets by the same words
    assert main(["data", "check", "--suite", args[2], "--data-root", args[4], "--deep"]) == 1
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert lines["b"].split()[1] == "malformed" and "s1.jpg" in lines["b"]
    assert lines["gone"].split()[1] == "missing" and lines["a"].split()[1] == "found"

    # --strict stops at the first dataset not evaluated; what follows is not run
    strict = tmp_path / "strict"
    assert main([*args[:6], str(strict), *args[7:], "--strict"]) == 1
    assert sorted(_results(strict)) == ["a", "b"] and "because of --strict" in capsys.readouterr().out


def test_bad_labels_fail_their_dataset_with_the_file_named(tmp_path, capsys):
    args = bench_args(tmp_path, ["good", "range", "size", "ignored"])
    data = tmp_path / "data"
    label = np.array(Image.open(data / "range" / "ann" / "s0.png"))
    label[10, 10] = 7  # 3 classes
    Image.fromarray(label).save(data / "range" / "ann" / "s0.png")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(data / "size" / "ann" / "s1.png")
    for p in (data / "ignored" / "ann").glob("*.png"):
        Image.fromarray(np.full(np.array(Image.open(p)).shape, 255, np.uint8)).save(p)
    assert main(args) == 1
    r = {name: strict_json(tmp_path / "run" / "datasets" / f"{name}.json") for name in ("good", "range", "size",
                                                                                         "ignored")}
    assert r["good"]["status"] == "done"
    assert r["range"]["status"] == "failed" and r["range"]["file"].endswith("range/ann/s0.png")
    assert "7" in r["range"]["reason"]
    assert r["size"]["status"] == "failed" and r["size"]["file"].endswith("size/ann/s1.png")
    assert "differs from its image" in r["size"]["reason"]
    # nothing to score is not a result: no NaN in the JSON, a failure saying why
    assert r["ignored"]["status"] == "failed" and r["ignored"]["miou"] is None
    assert "every label pixel" in r["ignored"]["reason"] and "ignore_index 255" in r["ignored"]["reason"]


def test_a_run_that_evaluated_nothing_exits_1(tmp_path, capsys):
    args = bench_args(tmp_path, ["a", "b"])
    args[4] = str(tmp_path / "no-such-root")
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert {k: v["status"] for k, v in _results(tmp_path / "run").items()} == {"a": "missing", "b": "missing"}
    assert "no dataset was evaluated" in err and (tmp_path / "run" / "summary.md").exists()
    assert "no-such-root" in out


# ---------------------------------------------------------------- up-front checks
@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a predictor (the part that loads a model) is built."""
    def built(*args, **kwargs):
        raise AssertionError("a model was built before the bad value was reported")
    monkeypatch.setattr("ovseg.pipeline.factory.build_predictor", built)


TINY = str(Path(__file__).resolve().parent.parent / "configs" / "methods" / "tiny.yaml")


@pytest.mark.parametrize("extra, message", [
    (["--limit", "0"], "--limit must be at least 1, got 0"),
    (["--limit", "-1"], "--limit must be at least 1, got -1"),
    (["--num-workers", "-1"], "--num-workers must be at least 0, got -1"),
    (["--num-nodes", "0"], "--num-nodes must be at least 1, got 0"),
    (["--save-examples", "-2"], "--save-examples must be at least 0, got -2"),
    (["--method", TINY, "refiner.k=2.5"], "LPOSSPlusRefiner: k must be an integer, got 2.5"),
    (["--method", TINY, "refiner.k=true"], "LPOSSPlusRefiner: k must be an integer, got True"),
    (["--method", TINY, "refiner.k=0"], "LPOSSPlusRefiner: k must be at least 1, got 0"),
    (["--method", TINY, "refiner.kk=3"], "refiner 'lposs_plus': unknown option 'kk' (did you mean 'k'?)"),
    (["protocol.crop=40", "protocol.stride=50"], "stride 50 is larger than"),
])
def test_bad_values_are_refused_before_any_model_is_built(tmp_path, capsys, no_model, extra, message):
    args = bench_args(tmp_path, ["a"])
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert "'alpha'" not in err  # an unknown key is named alone, valid ones are not called refused
    assert not (tmp_path / "run").exists()


def test_an_output_that_cannot_be_written_is_refused_before_any_model(tmp_path, capsys, no_model):
    args = bench_args(tmp_path, ["a"])
    (tmp_path / "file").write_text("not a folder")
    assert main([*args[:6], str(tmp_path / "file" / "run"), *args[7:]]) == 2
    err = capsys.readouterr().err
    assert "cannot write to" in err and "choose another --output" in err and err.count("\n") == 1
    # a run folder whose datasets/ cannot take results is refused too (not after computing them)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "datasets").write_text("")
    assert main(args) == 2
    assert f"cannot write to {tmp_path / 'run' / 'datasets'}" in capsys.readouterr().err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not stop root")
def test_a_read_only_datasets_folder_is_refused_before_any_model(tmp_path, capsys, no_model):
    args = bench_args(tmp_path, ["a"])
    (tmp_path / "run" / "datasets").mkdir(parents=True)
    (tmp_path / "run" / "datasets").chmod(0o555)
    try:
        assert main(args) == 2
    finally:
        (tmp_path / "run" / "datasets").chmod(0o755)
    assert "Permission denied" in capsys.readouterr().err


def test_a_damaged_checkpoint_is_called_damaged_without_unsafe_advice(tmp_path, capsys):
    args = bench_args(tmp_path, ["a"])
    junk = tmp_path / "weights.pt"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert main(args + [f"predictor.pretrained={junk}"]) == 2
    err = capsys.readouterr().err
    assert "weights.pt" in err and "damaged" in err and err.count("\n") == 1
    assert "weights_only" not in err and "trust_checkpoint" not in err


# ---------------------------------------------------------------- one writer per run folder
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_run_lock_refuses_a_live_holder_and_takes_over_stale_ones(tmp_path):
    notes = []
    lock = RunLock(tmp_path, notes.append)
    lock.acquire()
    holder = json.loads((tmp_path / LOCK).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(Exception, match=f"in use by another bench \\(pid {os.getpid()} on host"):
        RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / LOCK).exists()

    # this host, a pid that no longer runs: stale
    (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "since": "then"}))
    with RunLock(tmp_path, notes.append):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert "no longer runs" in notes[-1]
    # another host: stale only when not refreshed for a while
    (tmp_path / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then"}))
    with pytest.raises(Exception, match="pid 1 on host elsewhere"):
        RunLock(tmp_path).acquire()
    old = time.time() - 3600
    os.utime(tmp_path / LOCK, (old, old))
    with RunLock(tmp_path, notes.append):
        pass
    assert "not refreshed for 60 minutes" in notes[-1]


def test_a_bench_on_a_folder_in_use_stops_before_any_model(tmp_path, capsys, no_model):
    args = bench_args(tmp_path, ["a"])
    with RunLock(tmp_path / "run"):  # another bench holds the folder
        assert main(args) == 2
    err = capsys.readouterr().err
    assert f"is in use by another bench (pid {os.getpid()} on host {socket.gethostname()}" in err


def test_atomic_writes_use_unique_temporary_files_and_leave_nothing_on_failure(tmp_path):
    from ovseg import atomic

    target = tmp_path / "x.json"
    atomic.write_text(target, "old")
    with atomic.atomic_path(target) as one, atomic.atomic_path(target) as two:
        assert one != two and one.parent == two.parent == tmp_path
        one.write_text("first")
        two.write_text("second")
    assert target.read_text() == "first"  # the last one to finish wins, whole
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed while writing")
    assert target.read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_a_damaged_config_is_rebuilt_and_no_result_is_recomputed(tmp_path, capsys):
    args = bench_args(tmp_path, ["a", "b"])
    assert main(args) == 0
    run = tmp_path / "run"
    config = run / "config.yaml"
    config.write_text(config.read_text()[: len(config.read_text()) // 3] + "\n  - [unclosed")
    stamps = {p.name: p.stat().st_mtime_ns for p in (run / "datasets").glob("*.json")}
    capsys.readouterr()
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "config.yaml is not valid YAML" in out and "rebuilt it" in out
    assert "a: already finished" in out and "b: already finished" in out
    assert "delete" not in out + err
    assert {p.name: p.stat().st_mtime_ns for p in (run / "datasets").glob("*.json")} == stamps
    assert yaml.safe_load(config.read_text())["suite"]["name"] == "mini"

    # results that do not record their configuration (written by an older ovseg): reported, nothing touched
    record = json.loads((run / "datasets" / "a.json").read_text())
    del record["identity"]
    (run / "datasets" / "a.json").write_text(json.dumps(record))
    config.write_text("method: [")
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert "cannot tell whether they belong to this run" in err and "restore config.yaml" in err
    assert "delete" not in out + err
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------- one run-folder schema
def test_identity_leaves_out_descriptions_and_published_numbers(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = bench_args(tmp_path, ["a"])
    default = [a for i, a in enumerate(args) if args[i - 1] != "--output" and a != "--output"]
    assert main(default) == 0
    runs = list((tmp_path / "runs" / "mini").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("fast-")
    capsys.readouterr()
    # a corrected published number or description: the same run folder, resumed, showing the new number
    assert main(default + ["description=another text", "published.miou.a=12.5", "published.source=paper"]) == 0
    assert "a: already finished" in capsys.readouterr().out
    assert list((tmp_path / "runs" / "mini").iterdir()) == runs
    assert "| 12.50 |" in (runs[0] / "summary.md").read_text()
    # something that changes numbers is another run
    assert main(default + ["refiner.num_iter=3"]) == 0
    assert len(list((tmp_path / "runs" / "mini").iterdir())) == 2
    assert main(["bench", *default[1:], "--output", str(runs[0]), "refiner.num_iter=3"]) == 2
    assert "differs in: method.refiner" in capsys.readouterr().err


def test_reports_use_the_suite_entries_stored_in_the_run_folder(tmp_path, capsys):
    args = bench_args(tmp_path, ["t1", "t2", "c"])
    suite = Path(args[2])
    text = suite.read_text().replace("  - name: t1\n", "  - name: t1\n    group: tasks\n    title: Tasks (one)\n")
    suite.write_text(text.replace("  - name: t2\n", "  - name: t2\n    group: tasks\n    title: Tasks (two)\n"))
    assert main(args + ["--datasets", "t1,c"]) == 0
    suite.write_text(suite.read_text().replace("group: tasks", "group: other"))  # the file changes later
    from ovseg.report import load_run, summarize

    s = summarize(load_run(tmp_path / "run"))
    tasks = next(e for e in s.entries if e.name == "tasks")
    assert tasks.status == "incomplete" and "t2 missing" in tasks.reason  # not a mean over t1 alone
    assert s.mean.n_done == 1 and s.mean.n_total == 2


def test_run_folders_written_before_the_schema_version_are_read_and_resumed(tmp_path, capsys):
    args = bench_args(tmp_path, ["a"])
    assert main(args) == 0
    run = tmp_path / "run"
    # the layout ovseg wrote before this schema: no schema, identity digests, W&B id or cost
    doc = yaml.safe_load((run / "config.yaml").read_text())
    for key in ("schema", "identity", "wandb_id"):
        doc.pop(key)
    (run / "config.yaml").write_text(yaml.safe_dump(doc))
    record = json.loads((run / "datasets" / "a.json").read_text())
    for key in ("schema", "identity", "cost", "file", "limit"):
        record.pop(key)
    (run / "datasets" / "a.json").write_text(json.dumps(record))
    stamp = (run / "datasets" / "a.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "a: already finished" in capsys.readouterr().out
    assert (run / "datasets" / "a.json").stat().st_mtime_ns == stamp
    assert "| 1 | a | 2 |" in (run / "summary.md").read_text()


# ---------------------------------------------------------------- cost
def test_every_result_carries_its_cost(tmp_path, capsys):
    args = bench_args(tmp_path, ["a"])
    assert main(args) == 0
    cost = strict_json(tmp_path / "run" / "datasets" / "a.json")["cost"]
    assert cost["model_s_per_image"] > 0 and cost["refiner_s_per_image"] > 0 and cost["data_s_per_image"] > 0
    parts = cost["data_s_per_image"] + cost["model_s_per_image"] + cost["refiner_s_per_image"]
    assert cost["total_s_per_image"] >= parts
    assert cost["peak_rss_mb"] > 50 and cost["peak_gpu_mb"] is None  # CPU run
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "## Cost" in summary and "| a | 2 | " in summary.split("## Cost")[1]
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "summary.csv")))
    assert float(rows[0]["total_s_per_image"]) == pytest.approx(cost["total_s_per_image"])


def test_stage_clock_attributes_time_to_model_and_refiner():
    import torch

    from ovseg.evaluation.cost import StageClock

    class Slow(torch.nn.Module):
        def forward(self, x):
            time.sleep(0.05)
            return x

        def refine_canvas(self, image, scores):
            time.sleep(0.03)
            return scores

    segmenter = torch.nn.Module()
    segmenter.predictor, segmenter.extractor, segmenter.refiner = Slow(), None, Slow()
    clock = StageClock(segmenter).attach()
    segmenter.predictor(torch.zeros(1))
    segmenter.refiner.refine_canvas(None, torch.zeros(1))
    clock.detach()
    assert clock.seconds["model"] >= 0.05 and 0.03 <= clock.seconds["refiner"] < 0.05 + clock.seconds["model"]
    assert "refine_canvas" not in vars(segmenter.refiner)  # the refiner is left as it was
    segmenter.predictor(torch.zeros(1))
    assert clock.seconds["model"] < 0.1  # detached: no longer counted


# ---------------------------------------------------------------- pictures
def test_examples_are_written_for_a_finished_run_from_its_first_images_only(tmp_path, capsys):
    args = bench_args(tmp_path, ["a"], n=3)
    assert main(args) == 0
    record = tmp_path / "run" / "datasets" / "a.json"
    stamp = record.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args + ["--save-examples", "2"]) == 0
    out = capsys.readouterr().out
    assert "a: already finished" in out and "a: writing the examples of its first 2 images" in out
    assert record.stat().st_mtime_ns == stamp
    pictures = sorted(p.name for p in (tmp_path / "run" / "examples" / "a").iterdir())
    assert pictures == ["s0.png", "s1.png"]
    picture = np.asarray(Image.open(tmp_path / "run" / "examples" / "a" / "s0.png").convert("RGB"))
    assert tuple(picture[0, 0]) == (170, 20, 40)  # random weights: the red banner on top
    assert main(args + ["--save-examples", "2"]) == 0  # nothing left to do
    assert "writing the examples" not in capsys.readouterr().out


def test_example_picture_is_titled_solid_and_has_one_legend():
    from ovseg.visualize import RANDOM_WEIGHTS_BANNER, colour_labels, example_picture, palette

    h, w = 60, 80
    truth = np.zeros((h, w), np.int64)
    truth[:, 40:] = 1
    truth[:10] = 255
    pred = np.zeros((h, w), np.int64)
    pred[:, 20:] = 2
    image = np.full((h, w, 3), 90, np.uint8)
    plain = np.asarray(example_picture(image, pred, truth, ["zero", "one", "two"], 255, title="t"))
    marked = np.asarray(example_picture(image, pred, truth, ["zero", "one", "two"], 255, title="t",
                                        banner=RANDOM_WEIGHTS_BANNER))
    assert tuple(plain[0, 0]) == (255, 255, 255) and tuple(marked[0, 0]) == (170, 20, 40)
    assert marked.shape[0] > plain.shape[0] and marked.shape[1] == plain.shape[1]
    colours = {tuple(c) for c in plain.reshape(-1, 3).tolist()}
    for i in range(3):  # each class in its exact palette colour (no blending), in the panels and the legend
        assert tuple(palette(3)[i].tolist()) in colours
    # solid colours: the prediction's class-2 region has exactly the swatch colour, hatched grey for ignored
    solid = colour_labels(pred)
    assert (solid[30, 50] == palette(3)[2]).all() and (solid[30, 10] == palette(3)[0]).all()
    hatched = colour_labels(truth, 255)
    assert {tuple(c) for c in hatched[1:9, 1:30].reshape(-1, 3).tolist()} == {(200, 200, 200), (120, 120, 120)}
    assert {tuple(c) for c in hatched[:, 39:41].reshape(-1, 3).tolist()} >= {(25, 25, 25)}  # outline


def test_compare_chart_keeps_every_legend_swatch(tmp_path):
    from ovseg.report import load_run, summarize
    from ovseg.report.compare import bar_figure

    from .test_report import write_run

    a = write_run(tmp_path / "a", [{"dataset": "voc21", "miou": 0.6}, {"dataset": "voc20", "miou": 0.8}])
    b = write_run(tmp_path / "b", [{"dataset": "voc20", "miou": 0.5}], method="sclip")  # lacks the first
    legend = bar_figure([summarize(load_run(a)), summarize(load_run(b))]).axes[0].get_legend()
    handles = legend.legend_handles
    assert [t.get_text() for t in legend.get_texts()] == ["lposs_plus", "sclip"]
    assert all(h.get_visible() and h.get_facecolor()[3] == 1 for h in handles)
    assert handles[0].get_facecolor() != handles[1].get_facecolor()


# ---------------------------------------------------------------- W&B without a network
def offline_runs(tmp_path, run_id):
    """W&B's offline folders of one run id; a resume within the same second gets a '-1' suffix."""
    return [p for p in (tmp_path / "run" / "wandb").glob("offline-run-*")
            if p.name.endswith(f"-{run_id}") or f"-{run_id}-" in p.name]


@pytest.mark.slow
def test_wandb_with_credentials_but_no_network_falls_back_offline_and_resumes_the_same_run(tmp_path, monkeypatch,
                                                                                            capsys):
    pytest.importorskip("wandb")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: like a compute node without a route to W&B
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    args = bench_args(tmp_path, ["a", "b"]) + ["--wandb", "ovseg-test"]
    start = time.perf_counter()
    assert main(args + ["--datasets", "a"]) == 0
    assert time.perf_counter() - start < 120
    out = capsys.readouterr().out
    assert f"W&B: cannot reach 127.0.0.1:{port}" in out and "logging offline" in out
    run_id = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["wandb_id"]
    assert run_id and len(offline_runs(tmp_path, run_id)) == 1
    tables = list((tmp_path / "run" / "wandb").glob("offline-run-*/files/media/table/results_*.table.json"))
    table = json.loads(tables[0].read_text())
    row = dict(zip(table["columns"], table["data"][0]))
    assert row["dataset"] == "a" and row["total s/image"] > 0 and row["peak RSS (MB)"] > 0

    assert main(args) == 0  # resumed: a is skipped, b computed, in the same W&B run
    assert "a: already finished" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["wandb_id"] == run_id
    assert len(offline_runs(tmp_path, run_id)) == 2
