"""`ovseg bench`: run a method over every dataset of a suite and write the run folder.

Run folder: `config.yaml` (resolved config) and `datasets/<name>.json` (one per dataset); the report layer
adds `summary.csv` and `summary.md`. A dataset whose JSON says `done` is not recomputed, so an interrupted bench resumes,
unless the suite's entry for it changed since (see `_definition`); a folder holding a run of another
configuration is refused rather than mixed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Subset

from ovseg.version import __version__
from .methods import StageOptions, build_segmenter, dataset_protocol, dataset_vocabulary
from ovseg.errors import ConfigError, DatasetError
from ovseg.paths import data_root as default_data_root


@dataclass
class BenchOptions:
    output: Path
    data_root: Path | None = None
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    precision: str = "32-true"
    num_workers: int = 0
    limit: int | None = None
    strict: bool = False
    only: list[str] | None = None
    protocol_overrides: list[str] = field(default_factory=list)
    wandb_project: str | None = None
    progress: bool = True
    save_examples: int = 0


def is_rank_zero() -> bool:
    """Rank before Lightning starts its processes: children of the DDP launcher carry rank variables."""
    rank_vars = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "SLURM_PROCID")
    return all(os.environ.get(v, "0") == "0" for v in rank_vars)


def _identity(cfg: DictConfig, suite_name: str, opts: BenchOptions) -> dict[str, Any]:
    """What determines the numbers; a folder may only be resumed with the same identity."""
    return {
        "method": OmegaConf.to_container(cfg, resolve=True),
        "suite": suite_name,
        "limit": opts.limit,
        "precision": opts.precision,
        "protocol_overrides": list(opts.protocol_overrides),
    }


def environment() -> dict[str, Any]:
    """Versions recorded with every run (and printed by `ovseg env`)."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "torchvision", "lightning", "torchmetrics", "open_clip_torch", "timm", "datasets"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"ovseg": __version__, "python": platform.python_version(), "versions": versions}


def _prepare_run_dir(run_dir: Path, identity: dict, suite, random_weights: bool) -> None:
    config_path = run_dir / "config.yaml"
    if config_path.exists():
        saved = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
        old = {k: saved.get(k) for k in identity}
        old["suite"] = (saved.get("suite") or {}).get("name")
        if old != identity:
            changed = sorted(k for k in identity if old.get(k) != identity[k])
            raise ConfigError(
                f"output folder {run_dir} holds a run with a different configuration (differs in: "
                f"{', '.join(changed)}); choose another --output or delete that folder"
            )
    if not is_rank_zero():
        return
    (run_dir / "datasets").mkdir(parents=True, exist_ok=True)
    doc = dict(identity)
    doc["suite"] = {
        "name": suite.name,
        "datasets": [d.name for d in suite.datasets],
        # kept so reports of a custom suite know titles, domains and groups of datasets without results
        "entries": [{"name": d.name, "title": getattr(d, "title", None), "domain": getattr(d, "domain", None),
                     "group": getattr(d, "group", None)} for d in suite.datasets],
    }
    doc["random_weights"] = random_weights
    doc["environment"] = environment()
    OmegaConf.save(OmegaConf.create(doc), config_path)


def _nan_to_none(values: torch.Tensor) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in values.double().cpu().tolist()]


def _record(spec, suite_name: str, cfg: DictConfig, status: str, **extra) -> dict[str, Any]:
    published = cfg.published.get("miou", {}) if cfg.published else {}
    return {
        "dataset": spec.name,
        "title": getattr(spec, "title", None) or spec.name,
        "suite": suite_name,
        "domain": getattr(spec, "domain", None),
        "group": getattr(spec, "group", None),
        "method": cfg.name,
        "status": status,
        "reason": extra.pop("reason", None),
        "published": {
            "miou": published.get(spec.name) if published else None,
            "source": cfg.published.get("source") if cfg.published else None,
        },
        **extra,
    }


def _write_json(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)  # atomic: an interrupted write never leaves a half JSON that looks done


def _definition(spec, vocabulary, protocol) -> str:
    """Digest of what fixes a dataset's numbers besides the method: source, labels, classes, protocol.

    Classes and protocol are the effective ones (suite entry, then method and command-line layers).
    The run folder's identity holds the method and the suite's name but not the suite's content, so a
    result saved before the suite file changed (other class names, label conventions, protocol) must
    not be reused: each result records this digest and is recomputed when it no longer matches.
    """
    source = dataclasses.asdict(spec.source) if dataclasses.is_dataclass(spec.source) else repr(spec.source)
    doc = {
        "source": source,
        "classes": vocabulary.class_names,
        "shared_names": list(vocabulary.shared_names),
        "ignore_index": spec.ignore_index,
        "reduce_zero_label": spec.reduce_zero_label,
        "label_map": sorted(spec.label_map.items()),
        "protocol": protocol.to_dict(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _finished(path: Path, definition: str, log) -> bool:
    """Whether `path` holds a finished result for this dataset definition (older results have none)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if saved.get("status") != "done":
        return False
    if saved.get("definition", definition) != definition:
        log(f"{saved.get('dataset', path.stem)}: the suite's definition of this dataset changed since {path} was "
            "written (classes, labels, source or protocol); recomputing it")
        return False
    return True


@dataclass
class BenchRun:
    """What a finished bench leaves to its caller (rank 0): the run folder, and the W&B logger if any."""

    run_dir: Path
    logger: Any = None


def run_bench(suite_spec: str, cfg: DictConfig, opts: BenchOptions, log=print) -> BenchRun | None:
    """Evaluate `cfg` on every dataset of the suite and write one result per dataset into the run folder.

    Returns the run (rank 0) or None (other ranks). Summaries are the report layer's job (`ovseg.report`).
    """
    from .engine import BenchModule, ResizedDataset, evaluate, make_trainer
    from .suites import load_suite

    suite = load_suite(suite_spec)
    datasets = suite.datasets
    if opts.only:
        unknown = sorted(set(opts.only) - {d.name for d in datasets})
        if unknown:
            raise ConfigError(f"--datasets {unknown} not in suite {suite.name} ({', '.join(d.name for d in datasets)})")
        datasets = [d for d in datasets if d.name in opts.only]
    data_root = opts.data_root or default_data_root()
    run_dir = Path(opts.output)
    # built first: a bad --accelerator/--devices is reported before any model loads
    trainer = make_trainer(opts.accelerator, opts.devices, opts.num_nodes, None, opts.progress)
    segmenter = build_segmenter(cfg)
    stage_options = StageOptions(cfg, {"predictor": segmenter.predictor, "refiner": segmenter.refiner})
    identity = _identity(cfg, suite.name, opts)
    _prepare_run_dir(run_dir, identity, suite, segmenter.random_weights)
    if segmenter.random_weights:
        log("note: random weights (pretrained=random): a smoke test, not a result")

    logger = None
    if opts.wandb_project:
        from .wandb_logging import make_wandb_logger

        logger = make_wandb_logger(opts.wandb_project, run_dir, identity, log=log)
        trainer.logger = logger

    for spec in datasets:
        out = run_dir / "datasets" / f"{spec.name}.json"
        protocol = dataset_protocol(cfg, spec.name, spec.protocol, opts.protocol_overrides)
        vocabulary = dataset_vocabulary(cfg, spec)
        definition = _definition(spec, vocabulary, protocol)
        if _finished(out, definition, log):
            log(f"{spec.name}: already finished in {out}, skipped")
            continue
        try:
            dataset = spec.build(data_root)
        except DatasetError as exc:
            if opts.strict:
                raise
            log(f"{spec.name}: MISSING, skipped ({exc})")
            if is_rank_zero():
                _write_json(out, _record(spec, suite.name, cfg, "missing", reason=str(exc)))
            continue
        if opts.limit is not None:
            dataset = Subset(dataset, range(min(opts.limit, len(dataset))))
        segmenter.protocol = protocol
        stage_options.apply(spec.name)
        writer = None
        if opts.save_examples > 0:
            from .examples import ExampleWriter

            writer = ExampleWriter(run_dir / "examples" / spec.name, vocabulary.display_names, spec.ignore_index,
                                   opts.save_examples)
        module = BenchModule(segmenter, vocabulary, spec.ignore_index, on_sample=writer, precision=opts.precision)
        start = time.perf_counter()
        results = evaluate(trainer, module, ResizedDataset(dataset, protocol), opts.num_workers)
        elapsed = time.perf_counter() - start
        if not trainer.is_global_zero:
            continue
        record = _record(
            spec,
            suite.name,
            cfg,
            "done",
            num_images=len(dataset),
            miou=float(results["iou"]["mean"]),
            biou=float(results["biou"]["mean"]),
            per_class={
                "names": vocabulary.display_names,
                "iou": _nan_to_none(results["iou"]["per_class"]),
                "biou": _nan_to_none(results["biou"]["per_class"]),
            },
            random_weights=segmenter.random_weights,
            elapsed_s=round(elapsed, 3),
            protocol=segmenter.protocol.to_dict(),
            definition=definition,
        )
        _write_json(out, record)
        log(f"{spec.name}: mIoU {100 * record['miou']:.2f}  Boundary IoU {100 * record['biou']:.2f}  "
            f"({record['num_images']} images, {elapsed:.1f} s)")
        if logger is not None:
            logger.log_metrics({f"{suite.name}/{spec.name}/miou": 100 * record["miou"],
                                f"{suite.name}/{spec.name}/biou": 100 * record["biou"]})

    if not is_rank_zero():
        return None
    return BenchRun(run_dir, logger)
