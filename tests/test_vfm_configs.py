"""ProxyCLIP and CASS method configs and their LPOSS+ combinations: schema, each repository's settings, every dataset
of standard8 and mess22 configured, per-dataset predictor options applied, and `ovseg bench` end to end."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ovseg.cli.main import main
from ovseg.evaluation.methods import (
    StageOptions, apply_overrides, build_segmenter, dataset_protocol, dataset_vocabulary, load_method, stage_kwargs,
)
from ovseg.evaluation.suites import load_suite
from ovseg.registry import load_plugin

METHODS = ["proxyclip", "cass", "proxyclip_lposs_plus", "cass_lposs_plus"]
STANDARD8 = {"voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff", "cityscapes", "ade20k"}
TINY_PREDICTOR = ["predictor.model=ovseg-tiny-vit", "predictor.pretrained=random", "predictor.templates=single",
                  "predictor.vfm.model=vit_base_patch8_224", "predictor.vfm.pretrained=random",
                  "predictor.vfm.model_kwargs={embed_dim: 64, depth: 2, num_heads: 2}"]
TINY_EXTRACTOR = ["extractor.model=vit_tiny_patch16_224", "extractor.pretrained=random", "extractor.model_kwargs={depth: 2}"]

# (short side, crop, stride, prob_thd) per dataset: ProxyCLIP's configs/cfg_*.py and segmentor defaults (e7b767f),
# CASS's (228ecdd; crop None = whole image)
PROXYCLIP = {"voc21": (336, 336, 112, 0.2), "context60": (336, 336, 112, 0.15), "coco_object": (336, 336, 112, 0.25),
             "voc20": (336, 336, 112, None), "context59": (336, 336, 112, None), "coco_stuff": (336, 336, 112, None),
             "cityscapes": (448, 224, 112, None), "ade20k": (448, 336, 112, None)}
CASS = {"voc21": (336, None, 112, 0.1), "context60": (336, 224, 112, 0.1), "coco_object": (336, 224, 112, 0.1),
        "voc20": (336, 224, 112, None), "context59": (336, 224, 112, None), "coco_stuff": (336, 224, 112, None),
        "cityscapes": (560, 224, 112, None), "ade20k": (336, 224, 112, None)}
# dataset key, global_semantics_weight, mean_vector_weight, h_threshold (CASS configs/cfg_*.py)
CASS_KNOBS = {"voc21": ("voc21", 0.1, 0.03, 0.1), "context60": ("context60", 0.25, 0.04, 0.09),
              "coco_object": ("coco_object", 0.25, 0.01, 0.1), "voc20": ("voc20", 0.4, 0.02, 0.1),
              "context59": ("context59", 0.25, 0.04, 0.09), "coco_stuff": ("coco_stuff164k", 0.2, 0.02, 0.02),
              "cityscapes": ("city_scapes", 0.1, 0.03, 0.14), "ade20k": ("ade20k", 0.3, 0.05, 0.06)}


@pytest.mark.parametrize("name", METHODS)
def test_schema_and_every_dataset_of_both_suites_is_configured(name):
    cfg = load_method(name)
    for stage, kind in (("predictor", "predictor"), ("extractor", "extractor"), ("refiner", "refiner")):
        spec = stage_kwargs(cfg[stage])
        if spec is not None:
            inspect.signature(load_plugin(kind, spec[0])).bind(**spec[1])
    options = load_plugin("predictor", cfg.predictor.name).options
    assert set(cfg.datasets) <= STANDARD8
    assert all(set(o.get("predictor", {})) <= set(options) for o in cfg.datasets.values())
    for suite in ("standard8", "mess22"):
        for spec in load_suite(suite).datasets:
            proto = dataset_protocol(cfg, spec.name, spec.protocol)
            vocab = dataset_vocabulary(cfg, spec)
            assert vocab.num_classes == len(spec.classes)
            if suite == "mess22":  # not configured by the authors: the method's defaults
                assert (proto.short_side, proto.crop, proto.prob_thd) == (
                    cfg.protocol.short_side, cfg.protocol.crop, None)


@pytest.mark.parametrize("name, table", [("proxyclip", PROXYCLIP), ("cass", CASS)])
def test_each_repositorys_protocol(name, table):
    cfg = load_method(name)
    for ds, (short, crop, stride, thd) in table.items():
        proto = dataset_protocol(cfg, ds)
        assert (proto.short_side, proto.crop, proto.stride, proto.prob_thd) == (short, crop, stride, thd), ds
        assert (proto.logit_scale, proto.area_thd, proto.long_side_max) == (40, None, 2048)
    predictor = OmegaConf.to_container(cfg.predictor)
    assert predictor["vfm"] == {"name": "dino", "model": "vit_base_patch8_224.dino", "pretrained": True,
                                "feature": "x" if name == "proxyclip" else "k"}
    assert (predictor["model"], predictor["pretrained"], cfg.refiner.name) == ("ViT-B-16", "openai", "none")
    assert set(cfg.published.miou) <= STANDARD8 and cfg.published.source


def test_cass_knobs_per_dataset_and_default():
    for name in ("cass", "cass_lposs_plus"):
        cfg = load_method(name)
        for ds, (key, gsw, mvw, h) in CASS_KNOBS.items():
            knobs = OmegaConf.to_container(cfg.datasets[ds].predictor)
            assert knobs == {"dataset": key, "global_semantics_weight": gsw, "mean_vector_weight": mvw,
                             "h_threshold": h}, ds
        p = cfg.predictor  # datasets the authors do not configure: Context59's knobs
        assert (p.dataset, p.global_semantics_weight, p.mean_vector_weight, p.h_threshold) == ("context59", 0.25, 0.04, 0.09)


def test_proxyclip_class_names_are_its_own_files():
    cfg = load_method("proxyclip")
    voc21 = OmegaConf.to_container(cfg.datasets.voc21.classes)
    assert len(voc21) == 21 and len(voc21[0]) == 26 and voc21[15] == "person" and voc21[20] == "tvmonitor"
    obj = OmegaConf.to_container(cfg.datasets.coco_object.classes)
    assert len(obj) == 81 and len(obj[0]) == 17 and obj[1] == "person" and obj[10] == "traffic light"
    assert "lamp" not in obj[0] and list(cfg.datasets.coco_object.shared_names) == ["bed"]
    assert cfg.datasets.voc20.classes[19] == "tvmonitor"
    assert all(isinstance(c, str) and "," not in c for c in obj[1:])


@pytest.mark.parametrize("name, base", [("proxyclip_lposs_plus", "proxyclip"), ("cass_lposs_plus", "cass")])
def test_combinations_are_the_predictor_with_lposs_plus(name, base):
    combo, pred_cfg, lposs = load_method(name), load_method(base), load_method("lposs_plus")
    assert combo.predictor == pred_cfg.predictor
    assert combo.extractor == lposs.extractor and combo.refiner == lposs.refiner
    assert not combo.published and "no published numbers" in combo.description
    specs = {spec.name: spec for spec in load_suite("standard8").datasets}
    for ds in STANDARD8:  # the predictor's windows and class names, LPOSS's decision
        a, b = dataset_protocol(combo, ds), dataset_protocol(pred_cfg, ds)
        assert (a.short_side, a.crop, a.stride) == (b.short_side, b.crop, b.stride)
        assert (a.logit_scale, a.prob_thd) == (None, None)
        assert dataset_vocabulary(combo, specs[ds]).names == dataset_vocabulary(pred_cfg, specs[ds]).names


def test_lposs_refiner_takes_scores_on_a_finer_grid_than_its_features():
    """ProxyCLIP's VFM grid (/8) or pixels, DINO ViT-B/16 features (/16): the scores are resampled to the features."""
    from ovseg import build_refiner

    refiner = build_refiner("lposs", k=20)
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0, 112, 0, 112], [0, 112, 56, 168]])
    scores, feats = torch.randn(2, 3, 14, 14, generator=g), torch.randn(2, 8, 7, 7, generator=g)
    out = refiner.refine_windows(None, boxes, scores, feats)
    resampled = F.interpolate(scores, size=(7, 7), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, refiner.refine_windows(None, boxes, resampled, feats))


def test_per_dataset_predictor_options_reach_cass_and_reset_elsewhere():
    cfg = apply_overrides(load_method("cass"), TINY_PREDICTOR)
    seg = build_segmenter(cfg)
    options = StageOptions(cfg, {"predictor": seg.predictor, "refiner": seg.refiner})
    options.apply("cityscapes")
    p = seg.predictor
    assert (p.dataset, p.global_semantics_weight, p.mean_vector_weight, p.h_threshold) == ("city_scapes", 0.1, 0.03, 0.14)
    options.apply("chase_db1")  # a MESS dataset: the method's defaults again
    assert (p.dataset, p.global_semantics_weight, p.mean_vector_weight, p.h_threshold) == ("context59", 0.25, 0.04, 0.09)
    bad = OmegaConf.merge(cfg, {"datasets": {"voc20": {"predictor": {"dataset": "voc2012"}}}})
    with pytest.raises(Exception, match="dataset"):
        StageOptions(bad, {"predictor": p, "refiner": seg.refiner}).apply("voc20")


@pytest.mark.parametrize("method, extra", [("proxyclip", []), ("cass_lposs_plus", TINY_EXTRACTOR)])
def test_bench_runs_end_to_end_with_tiny_models(tmp_path, method, extra):
    run = tmp_path / "run"
    argv = ["bench", "--suite", "demo", "--method", method, "--limit", "2", "--accelerator", "cpu", "--no-progress",
            "--output", str(run), *TINY_PREDICTOR, *extra,
            "protocol.short_side=112", "protocol.crop=112", "protocol.stride=56"]
    assert main(argv) == 0
    results = [json.loads(p.read_text()) for p in (run / "datasets").glob("*.json")]
    assert results and all(r["status"] == "done" for r in results)


def test_download_builds_the_predictors_vfm_so_its_weights_are_fetched(capsys):
    """`ovseg download` builds the segmenter: the VFM's weights are resolved too (here offline: the error says which
    and names the predictor's option)."""
    assert main(["download", "--method", "proxyclip", "predictor.model=ovseg-tiny-vit", "predictor.pretrained=random"]) == 2
    err = capsys.readouterr().err
    assert "vit_base_patch8_224.dino" in err and "predictor.vfm.pretrained" in err
