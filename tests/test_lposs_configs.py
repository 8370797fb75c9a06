"""LPOSS method configs: schema, the paper's settings, and the tiny smoke method end to end."""

from __future__ import annotations

import inspect
import time

import pytest
import torch
from omegaconf import OmegaConf

from ovseg.evaluation.methods import load_method, stage_kwargs
from ovseg.errors import WeightsError
from ovseg.pipeline.protocol import Protocol
from ovseg.registry import load_plugin

PAPER = dict(k=400, gamma=3.0, sigma=0.01, pix_dist_pow=1.0, alpha=0.95, tol=1e-6, maxiter=10)


@pytest.mark.parametrize("name", ["lposs", "lposs_plus", "tiny"])
def test_config_schema_and_options_bind(name):
    cfg = load_method(name)
    assert cfg.name == name
    for stage, kind in (("predictor", "predictor"), ("extractor", "extractor"), ("refiner", "refiner")):
        plugin, kwargs = stage_kwargs(cfg[stage])
        inspect.signature(load_plugin(kind, plugin)).bind(**kwargs)
    Protocol.from_dict(OmegaConf.to_container(cfg.protocol))
    refiner = OmegaConf.to_container(cfg.refiner)
    assert {k: refiner[k] for k in PAPER} == PAPER
    assert refiner["name"] == ("lposs" if name == "lposs" else "lposs_plus")
    if name != "lposs":
        assert (refiner["radius"], refiner["tau"]) == (6, 0.01)


@pytest.mark.parametrize("name", ["lposs", "lposs_plus"])
def test_paper_settings(name):
    cfg = OmegaConf.to_container(load_method(name))
    assert cfg["predictor"] == {"name": "maskclip", "model": "ViT-B-16", "pretrained": "laion2b_s34b_b88k", "templates": "imagenet80"}
    assert cfg["extractor"] == {"name": "dino", "model": "vit_base_patch16_224.dino", "pretrained": True, "feature": "v"}
    assert cfg["protocol"] == {"short_side": 448, "long_side_max": 2048, "crop": 224, "stride": 112,
                               "logit_scale": None, "prob_thd": None, "area_thd": None}
    published = cfg["published"]
    assert published["source"] and published["mean8"] == ({"miou": 41.3, "biou": 30.3} if name == "lposs" else {"miou": 42.1, "biou": 32.1})
    if published["miou"]:  # the second-hand per-dataset row must average to the sourced mean
        assert abs(sum(published["miou"].values()) / 8 - published["mean8"]["miou"]) < 0.05


def test_paper_method_without_weights_fails_fast():
    from ovseg.api import load_segmenter

    start = time.monotonic()
    with pytest.raises(WeightsError):
        load_segmenter("lposs_plus", device="cpu")
    assert time.monotonic() - start < 30


def test_tiny_method_segments_an_image():
    from ovseg.api import load_segmenter

    seg = load_segmenter("tiny", device="cpu")
    assert seg.random_weights
    image = (torch.rand(3, 150, 230, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    result = seg.segment(image, ["sky", "tree, trees", "road"])
    assert result.labels.shape == (150, 230) and result.scores.shape == (3, 150, 230)
    assert torch.isfinite(result.scores).all()
