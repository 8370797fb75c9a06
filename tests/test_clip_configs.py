"""The CLIP-family method configs follow the method-config schema and valid protocols."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ovseg.pipeline.protocol import Protocol
from ovseg.registry import load_plugin

ROOT = Path(__file__).resolve().parent.parent / "configs" / "methods"
METHODS = ["clip", "maskclip", "sclip", "clearclip", "naclip"]
DATASETS = {"voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff", "cityscapes", "ade20k"}
WITH_BACKGROUND = {"voc21", "context60", "coco_object"}


def _load(name):
    return OmegaConf.to_container(OmegaConf.load(ROOT / f"{name}.yaml"), resolve=True)


@pytest.mark.parametrize("name", METHODS)
def test_method_config_schema(name):
    cfg = _load(name)
    assert set(cfg) == {"name", "description", "predictor", "extractor", "refiner", "protocol", "datasets", "published"}
    assert cfg["name"] == name and cfg["predictor"]["name"] == name
    assert cfg["extractor"] is None
    # predictor and refiner options are accepted by the registered classes
    pred = dict(cfg["predictor"])
    inspect.signature(load_plugin("predictor", pred.pop("name"))).bind(**pred)
    ref = dict(cfg["refiner"])
    inspect.signature(load_plugin("refiner", ref.pop("name"))).bind(**ref)
    assert set(cfg["datasets"]) <= DATASETS
    assert set(cfg["published"]) == {"source", "miou"} and cfg["published"]["source"]
    assert set(cfg["published"]["miou"]) == DATASETS
    assert all(0 < v < 100 for v in cfg["published"]["miou"].values())


@pytest.mark.parametrize("name", METHODS)
def test_method_protocols_are_valid(name):
    cfg = _load(name)
    assert set(cfg["protocol"]) == {"short_side", "long_side_max", "crop", "stride", "logit_scale", "prob_thd", "area_thd"}
    for ds in DATASETS:
        override = cfg["datasets"].get(ds, {})
        assert set(override) <= {"protocol", "classes"}
        proto = Protocol.from_dict({**cfg["protocol"], **override.get("protocol", {})}, where=f"{name}.{ds}")
        # a background threshold on a dataset without background ruins it (SCLIP issue #2)
        if ds not in WITH_BACKGROUND:
            assert proto.prob_thd is None and proto.area_thd is None, ds


def test_published_protocol_details():
    """Spot checks of the per-paper settings (each repository's configs and segmentor)."""
    sclip, naclip, clear = _load("sclip"), _load("naclip"), _load("clearclip")
    assert sclip["datasets"]["voc21"]["protocol"] == {"logit_scale": 65, "prob_thd": 0.1, "area_thd": 0.1}
    assert sclip["datasets"]["coco_stuff"]["protocol"]["short_side"] == 448
    assert naclip["refiner"] == {"name": "pamr", "num_iter": 10, "dilations": [8, 16], "at": "original"}
    assert naclip["predictor"]["grid"] == "floor" and clear["predictor"]["grid"] == "center"
    # ClearCLIP's own class files: plain background / person / tvmonitor, no synonyms
    voc = clear["datasets"]["voc21"]["classes"]
    assert voc[0] == "background" and "tvmonitor" in voc and "person" in voc and all("," not in c for c in voc)
    assert naclip["datasets"]["voc21"]["protocol"]["crop"] is None and naclip["datasets"]["voc20"]["protocol"]["crop"] is None
    assert (clear["protocol"]["short_side"], clear["protocol"]["crop"], clear["protocol"]["stride"]) == (448, 448, 224)
