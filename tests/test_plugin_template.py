"""examples/plugin_template installs as its own distribution and plugs into every command.

The template is installed with pip into a temporary folder (`--target`, offline, no dependencies)
and the commands run in subprocesses with that folder on PYTHONPATH, exactly as an installed
third-party plugin is found: through its entry point. Nothing is installed into the environment, so
other tests never see the plugin and nothing needs uninstalling.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "examples" / "plugin_template"


def _run(args, env, cwd=None, timeout=300):
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    """Environment variables under which the template plugin is installed."""
    if _run([sys.executable, "-m", "pip", "--version"], os.environ.copy()).returncode != 0:
        pytest.skip("pip is not available in this interpreter, so the template cannot be installed")
    root = tmp_path_factory.mktemp("plugin")
    source, target = root / "src", root / "site"
    # build from a copy: setuptools writes egg-info and build/ next to the sources
    shutil.copytree(TEMPLATE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    install = _run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        os.environ.copy(),
    )
    assert install.returncode == 0, f"pip install of the template failed:\n{install.stdout}\n{install.stderr}"
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join([str(target), *filter(None, [env.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.setdefault("OVSEG_CACHE", str(root / "cache"))
    return {"env": env, "source": source, "root": root}


def _ovseg(plugin_env, *args):
    return _run([sys.executable, "-m", "ovseg.cli", *map(str, args)], plugin_env["env"])


def test_template_is_listed(plugin_env):
    result = _ovseg(plugin_env, "list")
    assert result.returncode == 0, result.stderr
    line = next((ln for ln in result.stdout.splitlines() if ln.strip().startswith("colorproto")), None)
    assert line is not None, result.stdout
    assert "ovseg_plugin_template.predictor:ColorPrototypePredictor" in line
    assert "plugin" in line and "template" in line  # its own distribution, not ovseg's


def test_template_contract_tests_pass(plugin_env):
    tests = plugin_env["source"] / "tests"
    result = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tests), str(tests)],
                  plugin_env["env"], cwd=tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_predict_with_the_template(plugin_env, tmp_path):
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :30] = (230, 20, 20)
    image[:, 30:] = (20, 20, 230)
    Image.fromarray(image).save(tmp_path / "img.png")
    method = plugin_env["source"] / "colorproto.yaml"
    result = _ovseg(plugin_env, "predict", tmp_path / "img.png", "predictor.colors={red: [255, 0, 0], blue: [0, 0, 255]}",
                    "--classes", "red; blue", "--method", method, "--accelerator", "cpu", "--output", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    labels = np.array(Image.open(tmp_path / "out" / "img_labels.png"))
    assert labels.shape == (40, 60)
    assert (labels[:, :26] == 0).all() and (labels[:, 34:] == 1).all()


def test_bench_demo_with_the_template(plugin_env, tmp_path):
    out = tmp_path / "run"
    result = _ovseg(plugin_env, "bench", "--suite", "demo", "--predictor", "colorproto", "--refiner", "none",
                    "--limit", "2", "--output", out, "--accelerator", "cpu", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    records = sorted((out / "datasets").glob("*.json"))
    assert records, result.stdout
    for path in records:
        record = json.loads(path.read_text())
        assert record["status"] == "done" and record["num_images"] == 2
        assert 0.0 <= record["miou"] <= 1.0
    assert (out / "summary.md").exists()
