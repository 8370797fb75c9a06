"""Packaging: a wheel (a non-editable install) carries the method and suite configs."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parent.parent


def test_package_data_globs_cover_every_config_file():
    # a new kind of file under configs/ must be added to the package-data globs, or wheels lose it
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["ovseg"]
    shipped = {p.relative_to(REPO / "ovseg") for g in globs for p in (REPO / "ovseg").glob(g)}
    present = {Path("configs") / p.relative_to(REPO / "configs") for p in (REPO / "configs").rglob("*") if p.is_file()}
    assert shipped == present
    assert (REPO / "ovseg" / "configs").resolve() == (REPO / "configs").resolve()


@pytest.mark.slow
def test_wheel_install_finds_its_configs(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "runs", "__pycache__", ".pytest_cache"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("ovseg-*.whl")
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, cwd=tmp_path)
    script = """
import ovseg, ovseg.paths
from ovseg.evaluation.methods import load_method
from ovseg.evaluation.suites import load_suite
print(ovseg.__file__)
print(ovseg.paths.config_dir())
print(load_method("lposs_plus").refiner.name, load_suite("standard8")["coco_object"].shared_names)
print(sorted(p.name for p in (ovseg.paths.config_dir() / "methods").glob("*.yaml")))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    module, configs, loaded, methods = done.stdout.strip().splitlines()
    assert Path(module).is_relative_to(target) and Path(configs) == target / "ovseg" / "configs"
    assert loaded == "lposs_plus ('bed',)"
    assert methods == str(sorted(p.name for p in (REPO / "configs" / "methods").glob("*.yaml")))
