"""Template ranking over a dataset's images, without labels, on 1..N processes (`ovseg rank-templates`).

FLOSS's stage 1 for every selected dataset of a suite: the method's predictor (a `TemplateRanker`,
e.g. `floss`) returns additive per-image statistics; they are summed in a torchmetrics metric whose
float64 states are summed across processes, through the same `trainer.predict` loop as `ovseg bench`
(each process gets a disjoint share of the images, so totals are exact; the predictor's per-image sums
are exact in float64, so 1 and N processes give the same file). Rank 0 merges the result into the
output JSON, as the authors' code merges into an existing file, and writes it atomically. A dataset the
file already ranks completely (same model, dataset, classes and templates) is skipped, so an
interrupted run resumes.

Which images: the suite's source of each dataset, labels never read, optionally moved to another split
(`--split`: a Hugging Face split, or the folder's split file of that name) or other folders (`--source
DATASET.KEY=VALUE`); see `ovseg.evaluation.data.images`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
import yaml
from omegaconf import DictConfig
from torchmetrics import Metric
from torch.utils.data import Subset

from ovseg.errors import ConfigError, DatasetError
from ovseg.paths import data_root as default_data_root
from ovseg.pipeline.protocol import Protocol
from ovseg.pipeline.ranking import TemplateRanker, TemplateStatistics
from ovseg.pipeline.vocabulary import Vocabulary
from ovseg.runtime import autocast, place

from ovseg import atomic
from .bench import EngineOptions

__all__ = ["TemplateEntropy", "RankingModule", "RankingOptions", "run_ranking", "output_path", "source_overrides"]


class TemplateEntropy(Metric):
    """Sums `TemplateStatistics` over images; the float64 states are summed across processes."""

    full_state_update = False

    def __init__(self, num_templates: int, num_classes: int, first: int = 0):
        super().__init__()
        self.first = first
        shape = (num_templates, num_classes)
        self.add_state("entropy_sum", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pixels", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, statistics: TemplateStatistics) -> None:
        if statistics.first != self.first or tuple(statistics.count.shape) != tuple(self.count.shape):
            raise ValueError(f"statistics for templates from {statistics.first} of shape {tuple(statistics.count.shape)}"
                             f" do not fit this metric ({self.first}, {tuple(self.count.shape)})")
        self.entropy_sum += statistics.entropy_sum.to(self.entropy_sum)
        self.count += statistics.count.to(self.count)
        self.pixels += statistics.pixels.to(self.pixels)

    def compute(self) -> TemplateStatistics:
        return TemplateStatistics(self.entropy_sum.cpu(), self.count.cpu(), self.pixels.cpu(), self.first)


class RankingModule(L.LightningModule):
    """Adds up one dataset's template statistics (no labels); `outcome` holds the synced totals."""

    def __init__(self, segmenter, vocabulary: Vocabulary, protocol: Protocol, precision: str = "32-true"):
        super().__init__()
        self.segmenter = segmenter
        self.vocabulary = vocabulary
        self.protocol = protocol
        self.precision = precision
        ranker = segmenter.predictor
        self.entropy = TemplateEntropy(ranker.num_templates, vocabulary.num_classes)
        self.outcome: TemplateStatistics | None = None  # what `engine.evaluate` returns

    def on_predict_start(self) -> None:
        # after Lightning moved the model: the run's precision, then the text classifiers in it
        place(self.segmenter, self.device, self.precision)
        self.segmenter.predictor.set_classes(self.vocabulary)

    def predict_step(self, batch: list[dict], batch_idx: int) -> None:
        for sample in batch:
            with autocast(self.device, self.precision):
                self.entropy.update(self.segmenter.predictor.template_statistics(sample["image"], self.protocol))
        return None

    def on_predict_epoch_end(self) -> None:
        self.outcome = self.entropy.compute()  # a collective under DDP: every rank calls it
        self.entropy.reset()


@dataclass
class RankingOptions(EngineOptions):
    output: str = ""  # a JSON path; `{dataset}` in it is replaced by each dataset's name
    split: str | None = None
    sources: list[str] = field(default_factory=list)  # [DATASET.]KEY=VALUE


def output_path(template: str, dataset: str, several: bool) -> Path:
    """The rankings file of one dataset: `template` with `{dataset}` replaced (required for several datasets)."""
    if "{dataset}" not in template:
        if several:
            raise ConfigError(f"--output {template!r}: several datasets are ranked; put {{dataset}} in the path "
                              "(e.g. rankings/{dataset}.json), one file per dataset as the authors' schema holds one")
        return Path(template)
    return Path(template.replace("{dataset}", dataset))


def source_overrides(items: list[str], datasets: list[str]) -> dict[str, dict[str, Any]]:
    """`--source [DATASET.]KEY=VALUE` items as {dataset: {key: value}}; values are YAML scalars (null, true)."""
    out: dict[str, dict[str, Any]] = {d: {} for d in datasets}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--source {item!r} is not of the form [DATASET.]KEY=VALUE (e.g. voc20.split_file=...)")
        key, value = item.split("=", 1)
        target, _, key = key.rpartition(".")
        if target and target not in out:
            raise ConfigError(f"--source {item!r}: {target!r} is not one of the datasets ranked ({', '.join(datasets)})")
        try:
            parsed = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            parsed = value
        for name in [target] if target else datasets:
            out[name][key] = parsed if parsed is None or isinstance(parsed, bool) else str(value)
    return out


def _read_previous(path: Path, dataset: str) -> dict | None:
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--output {path} exists but is not a readable rankings JSON ({exc}); move it away") from exc
    if not isinstance(doc, Mapping) or not isinstance(doc.get("classes"), Mapping):
        raise ConfigError(f"--output {path} exists but is not a rankings file (no `classes`); move it away")
    if doc.get("dataset") not in (None, dataset):
        raise ConfigError(f"--output {path} holds the rankings of dataset {doc.get('dataset')!r}, not {dataset!r}; "
                          "choose another --output (one file per dataset)")
    return dict(doc)


def _write_atomically(path: Path, document: Mapping) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(document, indent=2))  # never a half-written file a rerun would take as done


def run_ranking(suite_spec: str, cfg: DictConfig, opts: RankingOptions, log=print) -> list[Path]:
    """Rank the templates of the method's predictor on every selected dataset; returns the files (rank 0)."""
    from .data.images import image_dataset, split_name, with_overrides, with_split
    from .engine import ResizedDataset, evaluate, make_trainer
    from .methods import StageOptions, build_segmenter, dataset_protocol, dataset_vocabulary
    from .suites import load_suite

    if not opts.output:
        raise ConfigError("--output: rank-templates needs the path of the rankings JSON to write")
    opts.check()
    datasets = opts.selected(load_suite(suite_spec))
    outputs = {d.name: output_path(opts.output, d.name, len(datasets) > 1) for d in datasets}
    overrides = source_overrides(opts.sources, [d.name for d in datasets])
    trainer = make_trainer(opts.accelerator, opts.devices, opts.num_nodes, None, opts.progress)
    segmenter = build_segmenter(cfg)
    if not isinstance(segmenter.predictor, TemplateRanker):
        raise ConfigError(f"method {cfg.name}: predictor {cfg.predictor.name!r} does not rank prompt templates; "
                          "use a FLOSS method (--method floss_naclip or floss_maskclip)")
    stage_options = StageOptions(cfg, {"predictor": segmenter.predictor})
    if segmenter.random_weights:
        log("note: random weights (pretrained=random): a smoke test, not rankings to use")
    written = []
    for spec in datasets:
        out = outputs[spec.name]
        protocol = dataset_protocol(cfg, spec.name, spec.protocol, opts.protocol_overrides)
        vocabulary = dataset_vocabulary(cfg, spec)
        stage_options.apply(spec.name)
        segmenter.protocol = protocol
        previous = _read_previous(out, spec.name)
        if previous is not None and segmenter.predictor.has_rankings(previous, spec.name, vocabulary):
            log(f"{spec.name}: already ranked in {out}, skipped")
            written.append(out)
            continue
        source = with_split(with_overrides(spec.source, overrides[spec.name], f"--source for dataset {spec.name}"),
                            opts.split, spec.name)
        try:
            images = image_dataset(source, opts.data_root or default_data_root())
        except DatasetError as exc:
            raise DatasetError(f"dataset {spec.name}: {exc}") from exc
        if opts.limit is not None:
            images = Subset(images, range(min(opts.limit, len(images))))
        module = RankingModule(segmenter, vocabulary, protocol, opts.precision)
        totals = evaluate(trainer, module, ResizedDataset(images, protocol), opts.num_workers)
        if trainer.is_global_zero:
            document = segmenter.predictor.rankings_document(totals, dataset=spec.name, split=split_name(source),
                                                            previous=previous)
            _write_atomically(out, document)
            log(f"{spec.name}: {len(images)} images, {vocabulary.num_classes} classes x "
                f"{segmenter.predictor.num_templates} templates ranked -> {out}")
        written.append(out)
    return written
