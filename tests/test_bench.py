"""`ovseg bench` end to end with tiny random models: outputs, resume, missing data, DDP parity, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg.cli.main import main

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "methods" / "tiny.yaml")
FAST = ["--method", TINY, "--accelerator", "cpu", "--no-progress"]


def _write_dataset(root: Path, n: int, seed: int) -> None:
    """Images with three vertical colour bands and matching labels (one ignore stripe)."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    (root / "ann").mkdir(parents=True)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
    for i in range(n):
        h, w = int(rng.integers(48, 72)), int(rng.integers(60, 90))
        label = np.zeros((h, w), np.uint8)
        cuts = sorted(rng.integers(10, w - 10, size=2))
        label[:, cuts[0]:] = 1
        label[:, cuts[1]:] = 2
        image = colours[label] + rng.integers(-20, 20, size=(h, w, 3))
        label[:2] = 255
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "img" / f"s{i}.jpg")
        Image.fromarray(label).save(root / "ann" / f"s{i}.png")


def _suite(path: Path, names: list[str]) -> Path:
    entries = "\n".join(
        f"""  - name: {n}
    source: {{type: folder, root: {n}, images: img, labels: ann, image_suffix: .jpg, label_suffix: .png}}
    classes: ["red, crimson", green, blue]
    ignore_index: 255
    protocol: {{short_side: 64, crop: 48, stride: 32}}"""
        for n in names
    )
    path.write_text(f"name: mini\ndescription: generated\ndatasets:\n{entries}\n")
    return path


def _results(run: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted((run / "datasets").glob("*.json"))}


def test_demo_suite_runs_end_to_end_with_tiny_models(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["bench", "--suite", "demo", "--limit", "3", "--output", str(run), "--save-examples", "2", *FAST]) == 0
    results = _results(run)
    assert results and all(r["status"] == "done" for r in results.values())
    for r in results.values():
        assert 0.0 <= r["miou"] <= 1.0 and 0.0 <= r["biou"] <= 1.0
        assert r["num_images"] == 3 and r["random_weights"] is True
    summary = (run / "summary.md").read_text()
    assert "random weights" in summary.lower()
    assert (run / "summary.csv").exists() and (run / "config.yaml").exists()
    examples = sorted((run / "examples").glob("*/*.png"))
    assert len(examples) == 2  # prediction | ground truth, side by side, wider than two images
    assert Image.open(examples[0]).width > 2 * 160


def test_interrupted_bench_resumes_without_recomputing(tmp_path, capsys):
    data = tmp_path / "data"
    _write_dataset(data / "first", 2, 0)
    _write_dataset(data / "second", 2, 1)
    broken = data / "second" / "img" / "s1.jpg"
    good_bytes = broken.read_bytes()
    broken.write_bytes(b"not an image")
    suite = _suite(tmp_path / "mini.yaml", ["first", "second"])
    run = tmp_path / "run"
    args = ["bench", "--suite", str(suite), "--data-root", str(data), "--output", str(run), *FAST]

    assert main(args) == 1  # the dataset with the unreadable image failed, naming it
    assert "s1.jpg" in capsys.readouterr().err
    first = run / "datasets" / "first.json"
    assert json.loads(first.read_text())["status"] == "done"
    assert json.loads((run / "datasets" / "second.json").read_text())["status"] == "failed"
    stamp = first.stat().st_mtime_ns

    broken.write_bytes(good_bytes)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "first: already finished" in out
    assert first.stat().st_mtime_ns == stamp
    assert {k: v["status"] for k, v in _results(run).items()} == {"first": "done", "second": "done"}


def test_result_of_a_dataset_whose_suite_entry_changed_is_recomputed(tmp_path, capsys):
    data = tmp_path / "data"
    _write_dataset(data / "first", 2, 0)
    _write_dataset(data / "second", 2, 1)
    suite = _suite(tmp_path / "mini.yaml", ["first", "second"])
    run = tmp_path / "run"
    args = ["bench", "--suite", str(suite), "--data-root", str(data), "--output", str(run), *FAST]
    assert main(args) == 0
    before = _results(run)
    assert before["first"]["definition"] != before["second"]["definition"]  # other source folder
    capsys.readouterr()

    # the suite file now names the first dataset's classes differently; the second is unchanged
    text = suite.read_text()
    cut = text.index("  - name: second")
    suite.write_text(text[:cut].replace('"red, crimson", green', '"red, crimson, scarlet", grass') + text[cut:])
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "first: the suite's definition of this dataset changed" in out and "first: already finished" not in out
    assert "second: already finished" in out
    after = _results(run)
    assert after["first"]["per_class"]["names"] == ["red", "grass", "blue"]
    assert after["first"]["definition"] != before["first"]["definition"]
    assert after["second"] == before["second"]


def test_missing_dataset_is_reported_and_strict_fails(tmp_path, capsys):
    data = tmp_path / "data"
    _write_dataset(data / "present", 2, 0)
    suite = _suite(tmp_path / "mini.yaml", ["present", "absent"])
    run = tmp_path / "run"
    assert main(["bench", "--suite", str(suite), "--data-root", str(data), "--output", str(run), *FAST]) == 0
    results = _results(run)
    assert results["absent"]["status"] == "missing" and "absent" in results["absent"]["reason"]
    assert "absent" in (run / "summary.md").read_text()
    assert "absent: missing" in capsys.readouterr().out
    code = main(["bench", "--suite", str(suite), "--data-root", str(data), "--output", str(tmp_path / "strict"),
                 "--strict", *FAST])
    assert code == 1 and "absent" in capsys.readouterr().out


def test_run_folder_of_another_configuration_is_refused(tmp_path, capsys):
    data = tmp_path / "data"
    _write_dataset(data / "present", 1, 0)
    suite = _suite(tmp_path / "mini.yaml", ["present"])
    base = ["bench", "--suite", str(suite), "--data-root", str(data), "--output", str(tmp_path / "run"), *FAST]
    assert main(base) == 0
    assert main(base + ["refiner.alpha=0.5"]) == 2
    assert "another configuration (differs in: method.refiner)" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--method", "nosuchmethod"], "unknown method 'nosuchmethod'"),
    (["--suite", "nosuchsuite"], "nosuchsuite"),
    (["--refiner", "lposs_pluss"], "Did you mean 'lposs_plus'"),
    (["widget.size=3"], "'widget' is not a method config key"),
    (["protocol.crop=0"], "crop"),
])
def test_bad_options_give_one_clear_error(tmp_path, capsys, args, message):
    argv = ["bench", "--suite", "demo", "--output", str(tmp_path / "run"), "--limit", "1", *FAST]
    if "--method" in args:
        argv = [a for a in argv if a != TINY and a != "--method"]
    assert main(argv + args) == 2
    assert message in capsys.readouterr().err


def _cli(args, env_extra=None, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "ovseg.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_two_processes_give_the_single_process_metrics(tmp_path):
    common = ["bench", "--suite", "demo", "--limit", "5", *FAST]
    one = _cli(common + ["--devices", "1", "--output", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli(common + ["--devices", "2", "--output", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = _results(tmp_path / "one"), _results(tmp_path / "two")
    assert r1.keys() == r2.keys()
    for name in r1:
        assert r1[name]["per_class"] == r2[name]["per_class"]
        assert r1[name]["miou"] == pytest.approx(r2[name]["miou"], abs=1e-12)


def test_default_method_without_weights_stops_with_one_message(tmp_path):
    empty = {"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_OFFLINE": "1",
             "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = _cli(["bench", "--suite", "demo", "--output", str(tmp_path / "run"), "--no-progress"], empty, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "ovseg: error: method lposs_plus:" in result.stderr and "ovseg download" in result.stderr


def test_overrides_after_options_and_malformed_overrides(tmp_path, capsys):
    base = ["bench", "--suite", "demo", "--limit", "1", "--output", str(tmp_path / "run"), *FAST]
    assert main(base + ["refiner.maxiter=3"]) == 0
    assert "maxiter: 3" in (tmp_path / "run" / "config.yaml").read_text()
    assert main(base + ["predictor.colors={red:[1,2"]) == 2
    assert "cannot apply overrides" in capsys.readouterr().err
    assert main(base + ["--no-such-flag"]) == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    assert main(["bench", "--precision", "fp7"]) == 2
    assert "invalid choice: 'fp7'" in capsys.readouterr().err


@pytest.mark.slow
def test_wandb_offline_run_holds_the_comparison_table(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    run = tmp_path / "run"
    assert main(["bench", "--suite", "demo", "--limit", "2", "--output", str(run), "--wandb", "ovseg-test", *FAST]) == 0
    tables = list((run / "wandb").glob("offline-run-*/files/media/table/comparison_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    record = json.loads((run / "datasets" / "demo.json").read_text())
    row = dict(zip(table["columns"], table["data"][0]))
    assert row["method"] == "tiny" and row["random_weights"] is True
    assert row["mean mIoU"] == pytest.approx(round(100 * record["miou"], 2))


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_bench_runs_in_bfloat16(tmp_path, precision):
    run = tmp_path / precision
    assert main(["bench", "--suite", "demo", "--limit", "1", "--output", str(run), "--precision", precision, *FAST]) == 0
    record = _results(run)["demo"]
    assert record["status"] == "done" and 0.0 <= record["miou"] <= 1.0
    assert f"precision: {precision}" in (run / "config.yaml").read_text()


def test_env_and_list_commands(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "CUDA available" in out and "configs:" in out
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("maskclip", "lposs_plus", "dino", "mess22", "tiny"):
        assert name in out
