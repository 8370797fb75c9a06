"""The SC-CLIP and ResCLIP method configs: schema, each repository's per-dataset protocol and knobs, per-dataset
predictor options reaching `configure`, and `ovseg bench` end to end with a tiny random 12-layer CLIP."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ovseg.cli.main import main
from ovseg.errors import ConfigError
from ovseg.evaluation.methods import StageOptions, load_method
from ovseg.pipeline.protocol import Protocol
from ovseg.registry import load_plugin

ROOT = Path(__file__).resolve().parent.parent / "configs" / "methods"
DATASETS = {"voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff", "cityscapes", "ade20k"}
WITH_BACKGROUND = {"voc21", "context60", "coco_object"}
METHODS = ["scclip", "resclip", "resclip_sclip"]
TINY = ["predictor.model=ovseg-tiny-vit-12", "predictor.pretrained=random", "predictor.templates=single"]


def _load(name):
    return OmegaConf.to_container(OmegaConf.load(ROOT / f"{name}.yaml"), resolve=True)


def _protocol(cfg, ds):
    return Protocol.from_dict({**cfg["protocol"], **cfg["datasets"].get(ds, {}).get("protocol", {})}, where=ds)


@pytest.mark.parametrize("name", METHODS)
def test_schema_protocols_and_options(name):
    cfg = _load(name)
    assert set(cfg) == {"name", "description", "predictor", "extractor", "refiner", "protocol", "datasets", "published"}
    assert cfg["name"] == name and cfg["extractor"] is None and cfg["refiner"] == {"name": "none"}
    pred = dict(cfg["predictor"])
    cls = load_plugin("predictor", pred.pop("name"))
    inspect.signature(cls).bind(**pred)
    assert set(cfg["datasets"]) <= DATASETS
    for ds in DATASETS:
        override = cfg["datasets"].get(ds, {})
        assert set(override) <= {"protocol", "predictor"}  # the suite's (= the repositories') class names
        assert set(override.get("predictor", {})) <= set(cls.options)
        proto = _protocol(cfg, ds)
        assert proto.short_side == (560 if ds == "cityscapes" else 336) and proto.area_thd in (None, 0.1)
        if ds not in WITH_BACKGROUND:  # a background threshold on a dataset without background ruins it
            assert proto.prob_thd is None and proto.area_thd is None, ds
    assert cfg["published"]["source"]


def test_scclip_protocol_is_the_repositorys():
    """SC-CLIP's cfg files differ from SCLIP's only where stated (VOC21, Context60, COCO-Object, COCO-Stuff 336)."""
    cfg = _load("scclip")
    assert "pre_adjust_idx" not in cfg["predictor"]  # the depth decides (12: 8/3/3/10, 24: the ViT-L/14 values)
    got = {ds: _protocol(cfg, ds) for ds in DATASETS}
    assert all((p.crop, p.stride) == (224, 112) for p in got.values())
    assert (got["voc21"].logit_scale, got["voc21"].prob_thd, got["voc21"].area_thd) == (50, 0.15, 0.1)
    assert (got["context60"].logit_scale, got["context60"].prob_thd) == (40, 0.15)
    assert (got["coco_object"].logit_scale, got["coco_object"].prob_thd) == (55, 0.35)
    assert all(got[ds].logit_scale == 40 for ds in DATASETS - {"voc21", "coco_object"})
    assert cfg["published"]["miou"] == {}  # no per-dataset table could be sourced; none is invented


@pytest.mark.parametrize("name,base", [("resclip", "naclip"), ("resclip_sclip", "sclip")])
def test_resclip_protocol_and_knobs_are_the_repositorys(name, base):
    cfg = _load(name)
    assert cfg["predictor"]["base"] == base and cfg["predictor"]["grid"] == "floor"
    assert cfg["predictor"]["use_rcs"] is True and cfg["predictor"]["use_sfr"] is True
    got = {ds: _protocol(cfg, ds) for ds in DATASETS}
    assert {ds for ds, p in got.items() if p.crop is None} == {"voc21", "voc20"}  # slide_crop=0
    assert all(p.logit_scale == 40 for p in got.values())
    knobs = {ds: cfg["datasets"][ds]["predictor"] for ds in DATASETS}
    table = {  # configs/cfg_<dataset>.py: temp_thd, rcs (tau, lambda), sfr (tau, lambda)
        "voc21": (0.5, [2.0, 0.3], [2.2, 0.7]), "context60": (0.3, [2.0, 0.3], [1.8, 0.7]),
        "coco_object": (0.11, [2.0, 0.4], [1.8, 0.7]), "voc20": (0.1, [2.0, 0.6], [2.1, 0.6]),
        "context59": (0.25, [2.0, 0.4], [1.8, 0.7]), "coco_stuff": (0.11, [2.0, 0.4], [1.8, 0.7]),
        "cityscapes": (0.1, [2.0, 0.2], [2.1, 0.6]), "ade20k": (0.25, [2.0, 0.3], [2.1, 0.7]),
    }
    assert {ds: (k["temp_thd"], k["attn_rcs_weights"], k["attn_sfr_weights"]) for ds, k in knobs.items()} == table
    miou = cfg["published"]["miou"]
    assert set(miou) == DATASETS
    # the tables' own averages (Table 1 "Avg." over 3 sets, Table 2 over 5), up to the rounding of their inputs
    averages = {"resclip": (43.2, 40.3), "resclip_sclip": (42.7, 39.3)}[name]
    assert abs(sum(miou[d] for d in WITH_BACKGROUND) / 3 - averages[0]) <= 0.1
    assert abs(sum(miou[d] for d in DATASETS - WITH_BACKGROUND) / 5 - averages[1]) <= 0.1


def test_per_dataset_knobs_reach_the_predictor_and_do_not_leak():
    from ovseg import build_predictor

    cfg = load_method("resclip")
    pred = build_predictor("resclip", model="ovseg-tiny-vit-12", pretrained="random", templates="single")
    options = StageOptions(cfg, {"predictor": pred})
    options.apply("voc21")
    assert (pred.temp_thd, pred.attn_rcs_weights, pred.attn_sfr_weights) == (0.5, (2.0, 0.3), (2.2, 0.7))
    options.apply("cityscapes")
    assert (pred.temp_thd, pred.attn_rcs_weights, pred.attn_sfr_weights) == (0.1, (2.0, 0.2), (2.1, 0.6))
    options.apply("demo")  # no override: the values the predictor was built with
    assert (pred.temp_thd, pred.attn_rcs_weights, pred.attn_sfr_weights) == (0.1, (2.0, 0.6), (2.1, 0.6))
    bad = OmegaConf.merge(cfg, {"datasets": {"voc21": {"predictor": {"temp_thd": 1.5}}}})
    with pytest.raises(ConfigError, match="temp_thd must be at most 1.0"):
        StageOptions(bad, {"predictor": pred}).apply("voc21")
    unknown = OmegaConf.merge(cfg, {"datasets": {"voc21": {"predictor": {"temp_thresh": 0.5}}}})
    with pytest.raises(ConfigError, match="temp_thresh.*did you mean 'temp_thd'"):
        StageOptions(unknown, {"predictor": pred})


@pytest.mark.parametrize("method", ["scclip", "resclip"])
def test_bench_demo_end_to_end_with_a_tiny_12_layer_clip(tmp_path, method):
    run = tmp_path / "run"
    argv = ["bench", "--suite", "demo", "--method", method, "--limit", "2", "--output", str(run),
            "--accelerator", "cpu", "--no-progress", *TINY]
    assert main(argv) == 0
    result = json.loads((run / "datasets" / "demo.json").read_text())
    assert result["status"] == "done" and result["num_images"] == 2 and result["random_weights"] is True
    assert 0.0 <= result["miou"] <= 1.0
