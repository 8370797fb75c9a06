"""`ovseg rank-templates` (FLOSS stage 1 through the Lightning engine): the rankings file, resume, splits,
unlabeled folders, DDP parity, bad input; then `ovseg bench` with the rankings it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg.cli.main import main
from ovseg.errors import ConfigError
from ovseg.evaluation.data.images import image_dataset, split_name, with_split
from ovseg.evaluation.data.sources import FolderSource
from ovseg.evaluation.ranking import TemplateEntropy, output_path, source_overrides
from ovseg.pipeline.ranking import TemplateStatistics

REPO = Path(__file__).resolve().parent.parent
TINY = ["predictor.model=ovseg-tiny-vit", "predictor.pretrained=random"]
FAST = ["--accelerator", "cpu", "--no-progress"]
DEMO = ["rank-templates", "--suite", "demo", "--method", "floss_naclip", "--limit", "2", *FAST, *TINY]


def _images(folder: Path, n: int, seed: int = 0, size=(40, 56)) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        image = rng.integers(0, 255, size=(size[0] // 8, size[1] // 8, 3)).repeat(8, 0).repeat(8, 1)
        Image.fromarray(image.astype(np.uint8)).save(folder / f"im{i}.png")


def _suite(path: Path, source: str, name: str = "mine") -> str:
    path.write_text(f"""name: custom
datasets:
  - name: {name}
    source: {source}
    classes: [red, "green, lime", blue]
    protocol: {{short_side: 32, crop: 32, stride: 16}}
""")
    return str(path)


def test_demo_rankings_file_resume_and_bench_with_it(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main([*DEMO, "--output", str(out), "protocol.short_side=96", "protocol.crop=64", "protocol.stride=32"]) == 0
    doc = json.loads(out.read_text())
    assert {k: doc[k] for k in ("model", "dataset", "split")} == {"model": "naclip", "dataset": "demo", "split": "demo"}
    assert list(doc["classes"]) == ["sky", "grass", "water", "sand", "road"]
    for entry in doc["classes"].values():
        ranking = entry["entropy_ranking"]
        assert sorted(e["template_id"] for e in ranking) == list(range(80))
        assert [e["rank"] for e in ranking] == list(range(1, 81))
        assert [e["entropy"] for e in ranking] == sorted(e["entropy"] for e in ranking)
    # resumed: the dataset is already ranked, nothing recomputed, the file untouched
    before = out.stat().st_mtime_ns
    capsys.readouterr()
    assert main([*DEMO, "--output", str(out)]) == 0
    assert "already ranked" in capsys.readouterr().out and out.stat().st_mtime_ns == before
    # stage 2 with that file
    run = tmp_path / "run"
    assert main(["bench", "--suite", "demo", "--method", "floss_naclip", "--limit", "2", "--output", str(run), *FAST,
                 *TINY, f"predictor.rankings={out}", "protocol.short_side=96"]) == 0
    result = json.loads((run / "datasets" / "demo.json").read_text())
    assert result["status"] == "done" and 0.0 <= result["miou"] <= 1.0


def test_unlabeled_folder_and_split_file(tmp_path):
    """A folder of images without labels (no label folder at all); --split picks the split file of that name."""
    root = tmp_path / "data"
    _images(root / "images", 3)
    (root / "splits").mkdir()
    (root / "splits" / "val.txt").write_text("im0\n")
    (root / "splits" / "train.txt").write_text("im1\nim2\n")
    suite = _suite(tmp_path / "suite.yaml", f"{{type: folder, root: {root}, split_file: splits/val.txt}}")
    base = ["rank-templates", "--suite", suite, "--method", "floss_maskclip", *FAST, *TINY, "predictor.templates=single"]
    out = tmp_path / "r.json"
    assert main([*base, "--split", "train", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["split"] == "train" and doc["model"] == "maskclip" and list(doc["classes"]) == ["red", "green", "blue"]
    assert sum(e["pixel_percentage"] for c in doc["classes"].values() for e in c["entropy_ranking"]) == pytest.approx(100)
    source = FolderSource(root=str(root), split_file="splits/val.txt")
    assert [n for n, _ in image_dataset(with_split(source, "train", "mine")).items] == ["im1", "im2"]
    assert split_name(with_split(source, "train", "mine")) == "train"


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    suite = _suite(tmp_path / "suite.yaml", f"{{type: folder, root: {empty}}}")
    cases = [
        (["--suite", suite, "--method", "floss_naclip"], "no images (.jpg, .jpeg, .png"),
        (["--suite", "demo", "--method", "floss_naclip", "--split", "train"], "the demo source"),
        (["--suite", "demo", "--method", "tiny"], "does not rank prompt templates"),
        (["--suite", "demo", "--method", "floss_naclip", "--source", "other.images=x"], "'other' is not one of"),
        (["--suite", "demo", "--method", "floss_naclip", "--num-workers", "-1"], "--num-workers must be at least 0"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["rank-templates", *args, *FAST, *TINY, "--output", str(tmp_path / "x.json")]) == 2
        assert message in capsys.readouterr().err, args
    # a file of another dataset is never overwritten
    (tmp_path / "other.json").write_text(json.dumps({"model": "naclip", "dataset": "voc20", "classes": {}}))
    assert main([*DEMO, "--output", str(tmp_path / "other.json")]) == 2
    assert "holds the rankings of dataset 'voc20'" in capsys.readouterr().err


def test_output_paths_and_source_overrides():
    assert output_path("r.json", "voc20", several=False) == Path("r.json")
    assert output_path("r/{dataset}.json", "voc20", several=True) == Path("r/voc20.json")
    with pytest.raises(ConfigError, match=r"put \{dataset\} in the path"):
        output_path("r.json", "voc20", several=True)
    parsed = source_overrides(["voc20.split_file=a/train.txt", "images=imgs", "ade.split_file=null"], ["voc20", "ade"])
    assert parsed == {"voc20": {"split_file": "a/train.txt", "images": "imgs"}, "ade": {"images": "imgs", "split_file": None}}
    with pytest.raises(ConfigError, match="not of the form"):
        source_overrides(["images"], ["voc20"])


def test_template_entropy_metric_sums_float64_states():
    metric = TemplateEntropy(num_templates=2, num_classes=3)
    a = TemplateStatistics(torch.rand(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64),
                           torch.tensor(6.0, dtype=torch.float64))
    metric.update(a)
    metric.update(a)
    total = metric.compute()
    assert torch.equal(total.entropy_sum, 2 * a.entropy_sum) and float(total.pixels) == 12.0
    assert metric.entropy_sum.dtype == torch.float64
    with pytest.raises(ValueError, match="do not fit"):
        metric.update(TemplateStatistics(a.entropy_sum, a.count, a.pixels, first=5))


def _cli(args, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "ovseg.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_two_processes_write_the_single_process_file(tmp_path):
    common = [*DEMO, "protocol.short_side=64", "protocol.crop=64", "protocol.stride=32"]
    one = _cli([*common, "--devices", "1", "--output", str(tmp_path / "one.json")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli([*common, "--devices", "2", "--output", str(tmp_path / "two.json")])
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "one.json").read_text() == (tmp_path / "two.json").read_text()
