"""`ovseg bench`: run a method over every dataset of a suite and write the run folder.

The order of work is what keeps a long run safe:

1. everything that needs no model: options (`BenchOptions.check`), the suite and `--datasets`, every
   dataset's protocol and classes, the refiner's option values, the devices; then the output folder
   (writable, including `datasets/`), its lock (one writer per folder) and its manifest (a folder
   of another configuration is refused, a damaged manifest is rebuilt when the results it holds
   match this run, see `_reconcile`). Any problem here stops the bench with one message;
2. the model, and the per-dataset stage options checked on it;
3. the datasets, one at a time. A dataset whose record is `done` (same run identity, same suite
   entry) is skipped, so a rerun resumes; with `--save-examples N` its missing pictures are made from
   its first N images alone. A dataset that is missing or malformed, or fails in the model, gets a
   `missing` / `failed` record with the reason and the file, and the bench goes on (`--strict`:
   stops at the first one).

SIGTERM / SIGINT stop every process within seconds (`ovseg.evaluation.interrupt`); records are
written whole or not at all (`ovseg.atomic`), so nothing partial is left behind.
The run folder's layout is `ovseg.evaluation.rundir`; summaries are the report layer's job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Subset

from ovseg.errors import ConfigError, DatasetError
from ovseg.paths import data_root as default_data_root
from ovseg.version import __version__

from .data.check import problem_kind
from .interrupt import LAUNCHER_ENV, Interrupted, stop_on_signals
from .methods import StageOptions, build_segmenter, dataset_protocol, dataset_vocabulary, stage_kwargs
from .rundir import (
    RESULTS,
    DamagedManifest,
    DatasetRecord,
    Identity,
    Manifest,
    SuiteEntry,
    finite_list,
    read_manifest,
    read_records,
    record_path,
    write_manifest,
    write_record,
)
from .runlock import RunLock


@dataclass
class EngineOptions:
    """Settings of a pass over a suite's datasets through the Lightning engine (`bench`, `rank-templates`)."""

    data_root: Path | None = None
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    precision: str = "32-true"
    num_workers: int = 0
    limit: int | None = None
    only: list[str] | None = None
    protocol_overrides: list[str] = field(default_factory=list)
    progress: bool = True

    def _rules(self) -> list[tuple[str, Any, int, bool]]:
        """(flag, value, minimum, None allowed) of each integer option."""
        rules = [("--limit", self.limit, 1, True), ("--num-workers", self.num_workers, 0, False),
                 ("--num-nodes", self.num_nodes, 1, False)]
        if self.devices != "auto":
            rules.append(("--devices", self.devices, 1, False))
        return rules

    def selected(self, suite) -> list:
        """The suite's dataset specs this run covers (`--datasets`, in suite order)."""
        specs = suite.datasets
        if self.only:
            unknown = sorted(set(self.only) - {d.name for d in specs})
            if unknown:
                raise ConfigError(f"--datasets {unknown} not in suite {suite.name} ({', '.join(d.name for d in specs)})")
            specs = [d for d in specs if d.name in self.only]
        return specs

    def check(self) -> None:
        """Refuse values no run can use, naming the option (before anything is loaded)."""
        for flag, value, minimum, optional in self._rules():
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{flag} must be an integer, got {value!r}")
            if value < minimum:
                raise ConfigError(f"{flag} must be at least {minimum}, got {value}")


@dataclass
class BenchOptions(EngineOptions):
    output: Path | None = None  # None: runs/<suite>/<method>-<identity digest>
    strict: bool = False
    wandb_project: str | None = None
    save_examples: int = 0

    def _rules(self) -> list[tuple[str, Any, int, bool]]:
        return super()._rules() + [("--save-examples", self.save_examples, 0, False)]


def is_rank_zero() -> bool:
    """Rank before Lightning starts its processes: children of the DDP launcher carry rank variables."""
    rank_vars = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "SLURM_PROCID")
    return all(os.environ.get(v, "0") == "0" for v in rank_vars)


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


def default_output(identity: Identity, method_name: str) -> Path:
    """runs/<suite>/<method>-<identity digest>: the same command finds the same folder."""
    return Path("runs") / identity.suite / f"{method_name}-{identity.digest[:8]}"


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


@dataclass
class _Plan:
    """One dataset's settings, all worked out before any model is built."""

    spec: Any
    protocol: Any
    vocabulary: Any
    definition: str


def _check_writable(run_dir: Path) -> None:
    """Create the run folder and `datasets/` and write a file in each, so that a folder where results
    cannot be saved is refused now and not after hours of computing."""
    for folder in (run_dir, run_dir / RESULTS):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test."):  # a unique name, removed on close
                pass
        except OSError as exc:
            raise ConfigError(
                f"--output {run_dir}: cannot write to {folder} ({exc.strerror or exc}); choose another --output "
                "or make it writable"
            ) from exc


def _reconcile(run_dir: Path, manifest: Manifest, log) -> Manifest:
    """Check the folder's manifest against this run's; returns the one to write (the W&B id carried on).

    A damaged manifest never costs a finished result: it is rebuilt when every result in the folder
    records this run's identity, and reported (with nothing changed) when some do not or cannot tell.
    """
    try:
        saved = read_manifest(run_dir)
    except DamagedManifest as exc:
        records = [r for r in read_records(run_dir).values() if r.status == "done"]
        foreign = sorted(r.name for r in records if r.identity not in (None, manifest.identity.digest))
        unknown = sorted(r.name for r in records if r.identity is None)
        kept = "nothing in the folder was changed"
        if foreign:
            raise ConfigError(f"{exc}; the results of {', '.join(foreign)} in {run_dir} belong to another "
                              f"configuration, so it cannot be rebuilt from this one ({kept}); choose another --output")
        if unknown:
            raise ConfigError(f"{exc}; the results of {', '.join(unknown)} in {run_dir} do not record their "
                              f"configuration, so ovseg cannot tell whether they belong to this run ({kept}); restore "
                              "config.yaml from a copy, or choose another --output")
        log(f"note: {exc}; rebuilt it from this run's configuration"
            + (f" ({len(records)} finished results record the same configuration and are kept)" if records else ""))
        return manifest
    if saved is None:
        return manifest
    if saved.identity != manifest.identity:
        changed = ", ".join(manifest.identity.differences(saved.identity))
        raise ConfigError(f"output folder {run_dir} holds a run of another configuration (differs in: {changed}); "
                          "choose another --output")
    manifest.wandb_id = saved.wandb_id
    return manifest


def _reusable(record: DatasetRecord | None, plan: _Plan, identity: str, log) -> bool:
    """Whether `record` is a finished result of this dataset for this run."""
    if record is None or record.status != "done":
        return False
    if record.identity is not None and record.identity != identity:
        log(f"{plan.spec.name}: its result was computed with another configuration; recomputing it")
        return False
    if (record.definition or plan.definition) != plan.definition:
        log(f"{plan.spec.name}: the suite's definition of this dataset changed since its result was written "
            "(classes, labels, source or protocol); recomputing it")
        return False
    return True


def _check_refiner_options(cfg: DictConfig, plans: list[_Plan]) -> None:
    """Build the refiner alone (no weights: cheap) with the method's and each dataset's options, so a bad
    value (`refiner.k=2.5`) is refused before the predictor's model is loaded."""
    from ovseg.pipeline.factory import build_refiner

    name, kwargs = stage_kwargs(cfg.refiner)
    refiner = build_refiner(name, **kwargs)
    for plan in plans:
        override = cfg.datasets.get(plan.spec.name, {}) if plan.spec.name in cfg.datasets else {}
        if "refiner" in override:
            try:
                refiner.configure(**OmegaConf.to_container(override.refiner, resolve=True))
            except ConfigError as exc:
                raise ConfigError(f"method {cfg.name}, datasets.{plan.spec.name}.refiner: {exc}") from exc


@dataclass
class BenchRun:
    """What a bench leaves to its caller (rank 0): the run folder, the datasets it was asked for, whether
    it stopped at a failure (`--strict`), and the W&B logger if any."""

    run_dir: Path
    datasets: list[str] = field(default_factory=list)
    logger: Any = None
    stopped_at: str | None = None


def run_bench(suite_spec: str, cfg: DictConfig, opts: BenchOptions, log=print) -> BenchRun | None:
    """Evaluate `cfg` on every dataset of the suite and write one result per dataset into the run folder.

    Returns the run (rank 0) or None (other ranks). Raises `Interrupted` on SIGTERM / SIGINT.
    """
    rank0 = is_rank_zero()
    with stop_on_signals() as stopper:
        return _run(suite_spec, cfg, opts, log if rank0 else (lambda *a, **k: None), rank0, stopper)


def _run(suite_spec, cfg, opts, log, rank0, stopper) -> BenchRun | None:
    from .engine import make_trainer
    from .suites import load_suite

    # 1. everything that needs no model
    opts.check()
    suite = load_suite(suite_spec)
    specs = opts.selected(suite)
    plans = []
    for spec in specs:
        protocol = dataset_protocol(cfg, spec.name, spec.protocol, opts.protocol_overrides)
        vocabulary = dataset_vocabulary(cfg, spec)
        plans.append(_Plan(spec, protocol, vocabulary, _definition(spec, vocabulary, protocol)))
    _check_refiner_options(cfg, plans)
    trainer = make_trainer(opts.accelerator, opts.devices, opts.num_nodes, None, opts.progress)
    method = OmegaConf.to_container(cfg, resolve=True)
    identity = Identity.of(method, suite.name, opts.limit, opts.precision, opts.protocol_overrides)
    run_dir = Path(opts.output) if opts.output is not None else default_output(identity, str(cfg.name))
    entries = [SuiteEntry(d.name, d.title or d.name, d.domain, d.group) for d in suite.datasets]
    manifest = Manifest(identity, method, entries, environment=environment())
    lock, launcher_env = None, os.environ.get(LAUNCHER_ENV)
    if rank0:
        _check_writable(run_dir)
        lock = RunLock(run_dir, log)
        lock.acquire()
        stopper.cleanup.append(lock.release)
        os.environ[LAUNCHER_ENV] = str(os.getpid())  # processes Lightning launches pass signals back to it
    try:
        if rank0:
            manifest = _reconcile(run_dir, manifest, log)
        return _evaluate_all(cfg, opts, suite, plans, trainer, manifest, run_dir, log, rank0)
    except BaseException as exc:
        if stopper.signum is None:
            raise
        # an error while stopping (a peer process gone from a collective) is part of the stop
        stop = exc if isinstance(exc, Interrupted) else Interrupted(stopper.signum)
        stop.run_dir = run_dir  # for the message: where the finished datasets are
        raise stop from (None if stop is exc else exc)
    finally:
        if lock is not None:
            lock.release()
            if launcher_env is None:  # processes this one starts later (not for this run) must not inherit it
                os.environ.pop(LAUNCHER_ENV, None)
            else:
                os.environ[LAUNCHER_ENV] = launcher_env


def _evaluate_all(cfg, opts, suite, plans, trainer, manifest, run_dir, log, rank0) -> BenchRun | None:
    # 2. the model, and the per-dataset stage options checked on it
    segmenter = build_segmenter(cfg)
    stage_options = StageOptions(cfg, {"predictor": segmenter.predictor, "refiner": segmenter.refiner})
    for plan in plans:
        try:
            stage_options.apply(plan.spec.name)
        except ConfigError as exc:
            raise ConfigError(f"method {cfg.name}, dataset {plan.spec.name}: {exc}") from exc
    manifest.random_weights = segmenter.random_weights
    if segmenter.random_weights:
        log("note: random weights (pretrained=random): a smoke test, not a result")
    logger = None
    if rank0:
        if opts.wandb_project:
            from .wandb_logging import new_run_id

            manifest.wandb_id = manifest.wandb_id or new_run_id()  # kept before the W&B run starts
        write_manifest(run_dir, manifest)
        if opts.wandb_project:
            from .wandb_logging import make_wandb_logger

            logger = make_wandb_logger(opts.wandb_project, run_dir, manifest.identity.as_dict(), manifest.wandb_id,
                                       group=suite.name, log=log)
            trainer.logger = logger

    # 3. the datasets
    bench = _Bench(cfg, opts, suite, trainer, segmenter, stage_options, manifest, run_dir, log, rank0, logger)
    records = read_records(run_dir)
    try:
        for plan in plans:
            if not bench.dataset(plan, records.get(plan.spec.name)) and opts.strict:
                bench.stopped_at = plan.spec.name
                log(f"stopped at the first dataset not evaluated ({plan.spec.name}) because of --strict")
                break
    except BaseException:
        if logger is not None:  # the W&B run ends as failed or interrupted (the stop watchdog bounds the wait)
            logger.experiment.finish(exit_code=1)
        raise
    if not rank0:
        return None
    return BenchRun(run_dir, [p.spec.name for p in plans], logger, bench.stopped_at)


class _Bench:
    """The per-dataset steps of one bench (every rank runs them in the same order)."""

    def __init__(self, cfg, opts, suite, trainer, segmenter, stage_options, manifest, run_dir, log, rank0, logger):
        self.cfg, self.opts, self.suite, self.trainer = cfg, opts, suite, trainer
        self.segmenter, self.stage_options, self.manifest = segmenter, stage_options, manifest
        self.run_dir, self.log, self.rank0, self.logger = run_dir, log, rank0, logger
        self.stopped_at: str | None = None
        self.data_root = opts.data_root or default_data_root()

    def record(self, plan: _Plan, status: str, **values) -> DatasetRecord:
        spec, published = plan.spec, self.manifest.published
        return DatasetRecord(
            name=spec.name, title=spec.title or spec.name, status=status, suite=self.suite.name, domain=spec.domain,
            group=spec.group, method=str(self.cfg.name), random_weights=bool(self.segmenter.random_weights),
            limit=self.opts.limit, protocol=plan.protocol.to_dict(), definition=plan.definition,
            identity=self.manifest.identity.digest,
            published_miou=(published.get("miou") or {}).get(spec.name), published_source=published.get("source"),
            **values,
        )

    def write(self, record: DatasetRecord) -> None:
        if self.rank0:
            write_record(self.run_dir, record)

    def dataset(self, plan: _Plan, previous: DatasetRecord | None) -> bool:
        """Evaluate one dataset (or skip it when finished); False when it could not be evaluated."""
        spec = plan.spec
        if _reusable(previous, plan, self.manifest.identity.digest, self.log):
            self.log(f"{spec.name}: already finished in {record_path(self.run_dir, spec.name)}, skipped")
            self.log_metrics(previous)
            if self.opts.save_examples > 0:
                self.missing_examples(plan)
            return True
        try:
            dataset = spec.build(self.data_root)
        except DatasetError as exc:
            kind = problem_kind(exc)
            self.log(f"{spec.name}: {kind} — {exc}")
            if kind == "missing":
                self.write(self.record(plan, "missing", reason=str(exc)))
            else:
                self.write(self.record(plan, "failed", reason=f"{kind}: {exc}", file=getattr(exc, "file", None)))
            return False
        if self.opts.limit is not None:
            dataset = Subset(dataset, range(min(self.opts.limit, len(dataset))))
        start = time.perf_counter()
        outcome = self.predict(plan, dataset, self.opts.save_examples)
        elapsed = round(time.perf_counter() - start, 3)
        common = dict(num_images=outcome.num_images, elapsed_s=elapsed, cost=outcome.cost)
        if outcome.failure is not None:  # the cost is that of the images evaluated before the failure
            f = outcome.failure
            self.log(f"{spec.name}: {f.kind} — {f.reason}")
            self.write(self.record(plan, "failed", reason=f"{f.kind}: {f.reason}", file=f.file,
                                   traceback=f.traceback, elapsed_s=elapsed, cost=outcome.cost))
            return False
        iou, biou = outcome.results["iou"], outcome.results["biou"]
        if math.isnan(float(iou["mean"])):
            reason = (f"nothing to score: every label pixel of the {outcome.num_images} images is ignore_index "
                      f"{spec.ignore_index}")
            self.log(f"{spec.name}: malformed — {reason}")
            self.write(self.record(plan, "failed", reason=f"malformed: {reason}", **common))
            return False
        record = self.record(
            plan, "done", miou=float(iou["mean"]), biou=float(biou["mean"]),
            per_class={"names": plan.vocabulary.display_names, "iou": finite_list(iou["per_class"].tolist()),
                       "biou": finite_list(biou["per_class"].tolist())},
            **common,
        )
        self.write(record)
        c = outcome.cost
        self.log(f"{spec.name}: mIoU {100 * record.miou:.2f}  Boundary IoU {100 * record.biou:.2f}  "
                 f"({record.num_images} images, {elapsed:.1f} s; {c.total_s_per_image:.3f} s/image, "
                 f"peak {c.peak_rss_mb:.0f} MB RSS" + (f", {c.peak_gpu_mb:.0f} MB GPU" if c.peak_gpu_mb else "") + ")")
        self.log_metrics(record)
        return True

    def predict(self, plan: _Plan, dataset, examples: int):
        from .engine import BenchModule, ResizedDataset, evaluate

        self.segmenter.protocol = plan.protocol
        self.stage_options.apply(plan.spec.name)
        writer = None
        if examples > 0:
            from .examples import ExampleWriter

            writer = ExampleWriter(self.run_dir / "examples" / plan.spec.name, plan.vocabulary.display_names,
                                   plan.spec.ignore_index, examples, title=f"{self.suite.name} / {plan.spec.name}",
                                   random_weights=self.segmenter.random_weights)
        module = BenchModule(self.segmenter, plan.vocabulary, plan.spec.ignore_index, on_sample=writer,
                             precision=self.opts.precision)
        return evaluate(self.trainer, module, ResizedDataset(dataset, plan.protocol), self.opts.num_workers)

    def missing_examples(self, plan: _Plan) -> None:
        """Pictures asked for on a finished dataset: segment only the first N images (no result written)."""
        from .examples import example_files

        try:
            dataset = self.plan_dataset(plan)
        except DatasetError as exc:
            self.log(f"{plan.spec.name}: no examples ({problem_kind(exc)} — {exc})")
            return
        wanted = min(self.opts.save_examples, len(dataset))
        if len(example_files(self.run_dir / "examples" / plan.spec.name)) >= wanted:
            return
        self.log(f"{plan.spec.name}: writing the examples of its first {wanted} images")
        outcome = self.predict(plan, Subset(dataset, range(wanted)), wanted)
        if outcome.failure is not None:
            self.log(f"{plan.spec.name}: examples incomplete: {outcome.failure.kind} — {outcome.failure.reason}")

    def plan_dataset(self, plan: _Plan):
        dataset = plan.spec.build(self.data_root)
        return Subset(dataset, range(min(self.opts.limit, len(dataset)))) if self.opts.limit is not None else dataset

    def log_metrics(self, record: DatasetRecord) -> None:
        """Per-dataset numbers to W&B, also for results a resumed run skips (the W&B run is the same)."""
        if self.logger is None:
            return
        name = f"{self.suite.name}/{record.name}"
        values = {f"{name}/miou": 100 * record.miou, f"{name}/biou": 100 * record.biou}
        if record.cost is not None:
            values.update({f"{name}/{k}": v for k, v in dataclasses.asdict(record.cost).items() if v is not None})
        self.logger.log_metrics(values)
