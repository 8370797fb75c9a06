"""Plugin discovery through entry points of a separately installed distribution."""

import subprocess
import sys
import textwrap

import pytest

from ovseg import build_refiner, list_plugins
from ovseg.errors import PluginError
from ovseg.registry import load_plugin

PLUGIN = '''
import torch
from ovseg.pipeline.stages import Refiner

class ConstantRefiner(Refiner):
    """Returns the mean window score everywhere: enough to prove the class was built."""
    def __init__(self, offset=0.0):
        super().__init__()
        self.offset = offset
    def forward(self, image, boxes, scores, features=None):
        q = scores.shape[1]
        return scores.mean((0, 2, 3)).view(q, 1, 1).expand(q, *image.shape[-2:]) + self.offset

class NotAStage:
    pass
'''


def _install_fake_distribution(site, name, entry_points, module_source=None):
    """What pip leaves behind: a module and a .dist-info folder with entry_points.txt."""
    if module_source is not None:
        (site / f"{name}.py").write_text(module_source)
    info = site / f"{name}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


def _run(site, code):
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env)


def test_plugin_from_separate_distribution_is_discovered_and_built(tmp_path):
    _install_fake_distribution(
        tmp_path, "thirdparty_refiner",
        """
        [ovseg.refiners]
        constant = thirdparty_refiner:ConstantRefiner
        notastage = thirdparty_refiner:NotAStage
        broken = thirdparty_missing_module:Thing
        """,
        PLUGIN,
    )
    result = _run(tmp_path, """
        import torch, ovseg
        from ovseg.errors import PluginError
        infos = {i.name: i for i in ovseg.list_plugins("refiner")["refiner"]}
        print("dist", infos["constant"].distribution, infos["constant"].version)
        r = ovseg.build_refiner("constant", offset=1.0)
        out = r(torch.zeros(3, 5, 6), torch.tensor([[0, 5, 0, 6]]), torch.ones(1, 2, 3, 3), None)
        print("shape", tuple(out.shape), float(out[0, 0, 0]))
        for name in ("notastage", "broken"):
            try:
                ovseg.build_refiner(name)
            except PluginError as e:
                print("error", name, e)
    """)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "dist thirdparty_refiner 0.3" in out
    assert "shape (2, 5, 6) 2.0" in out
    assert "error notastage" in out and "not a subclass of ovseg.stages.Refiner" in out
    assert "error broken" in out and "failed to import" in out and "thirdparty_missing_module" in out


def test_duplicate_names_from_two_distributions_are_reported(tmp_path):
    _install_fake_distribution(tmp_path, "dist_a", "[ovseg.refiners]\ndup = dist_a:X\n")
    _install_fake_distribution(tmp_path, "dist_b", "[ovseg.refiners]\ndup = dist_b:Y\n")
    result = _run(tmp_path, """
        import ovseg
        try:
            ovseg.build_refiner("dup")
        except ovseg.errors.PluginError as e:
            print(e)
    """)
    assert "two refiner plugins are registered as 'dup'" in result.stdout, result.stderr


def test_unknown_name_lists_registered_names():
    with pytest.raises(PluginError) as err:
        build_refiner("lpos")
    message = str(err.value)
    assert "unknown refiner 'lpos'" in message and "none" in message and "Did you mean 'lposs'" in message


def test_first_party_plugins_register_through_entry_points():
    names = {k: {i.name for i in v} for k, v in list_plugins().items()}
    assert {"clip", "maskclip", "sclip", "clearclip", "naclip"} <= names["predictor"]
    assert {"none", "lposs", "lposs_plus"} <= names["refiner"]
    assert {"dino"} <= names["extractor"]
    assert {"demo", "standard8", "mess22"} <= names["suite"]


def test_wrong_options_name_the_plugin():
    with pytest.raises(PluginError, match="refiner 'none' does not accept the options \\['k'\\]"):
        build_refiner("none", k=3)


def test_importing_ovseg_does_not_import_model_libraries():
    result = subprocess.run([sys.executable, "-c", "import sys, ovseg; ovseg.list_plugins(); "
                             "print([m for m in ('open_clip', 'timm', 'torch') if m in sys.modules])"],
                            capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_load_plugin_kind_error():
    with pytest.raises(PluginError, match="unknown plugin kind"):
        load_plugin("widget", "x")
