"""Method configs: load the YAML, merge command-line choices, build the segmenter.

A method config names a predictor, an optional extractor and a refiner with their parameters, a
default protocol, per-dataset overrides and the published numbers it should reproduce:

    name: lposs_plus
    predictor: {name: maskclip, model: ViT-B-16, pretrained: laion2b_s34b_b88k}
    extractor: {name: dino, model: vit_base_patch16_224.dino, feature: v}   # or null
    refiner: {name: lposs_plus, k: 400}
    protocol: {short_side: 448, crop: 224, stride: 112}
    datasets: {voc21: {protocol: {prob_thd: 0.1}, classes: [...]}}   # also shared_names: [...]
    published: {source: "...", miou: {voc21: 61.1}}

Protocol precedence, lowest first: suite dataset, method `protocol`, method `datasets.<name>.protocol`,
command-line `protocol.*` overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

#: what a malformed YAML file or key=value override can raise
CONFIG_ERRORS = (OmegaConfBaseException, yaml.YAMLError, ValueError)

from ovseg.errors import ConfigError, WeightsError
from ovseg.paths import config_dir
from ovseg.pipeline.protocol import Protocol
from ovseg.pipeline.vocabulary import Vocabulary

DEFAULT_METHOD = "lposs_plus"
METHOD_KEYS = {"name", "description", "predictor", "extractor", "refiner", "protocol", "datasets", "published"}
STAGES = ("predictor", "extractor", "refiner")
#: what a method may change per dataset; stage options go through the stage's `configure(**options)`
DATASET_KEYS = {"protocol", "classes", "shared_names", "predictor", "refiner"}


def method_path(spec: str | Path | None) -> Path:
    """A method config path from a path or a name under `configs/methods/`."""
    spec = spec or DEFAULT_METHOD
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"method config {str(path)!r} does not exist")
        return path
    candidate = config_dir() / "methods" / f"{spec}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in (config_dir() / "methods").glob("*.yaml"))
        raise ConfigError(f"unknown method {str(spec)!r}: no file {candidate}. Known methods: {', '.join(known)}")
    return candidate


def load_method(spec: str | Path | None = None) -> DictConfig:
    """Load and check a method config (a path or a name such as `lposs_plus`)."""
    path = method_path(spec)
    try:
        cfg = OmegaConf.load(path)
    except (*CONFIG_ERRORS, OSError) as exc:
        raise ConfigError(f"cannot read method config {path}: {exc}") from exc
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"method config {path} must be a mapping")
    unknown = sorted(set(cfg.keys()) - METHOD_KEYS)
    if unknown:
        raise ConfigError(f"method config {path}: unknown key(s) {unknown}; known: {sorted(METHOD_KEYS)}")
    for stage in ("predictor", "refiner"):
        if not isinstance(cfg.get(stage), DictConfig) or "name" not in cfg[stage]:
            raise ConfigError(f"method config {path}: `{stage}:` must be a mapping with a `name`")
    cfg.setdefault("name", path.stem)
    cfg.setdefault("extractor", None)
    cfg.setdefault("protocol", {})
    cfg.setdefault("datasets", {})
    cfg.setdefault("published", {})
    Protocol.from_dict(OmegaConf.to_container(cfg.protocol), where=f"{path}: protocol")
    for dataset, override in cfg.datasets.items():
        extra = sorted(set(override.keys()) - DATASET_KEYS) if isinstance(override, DictConfig) else None
        if extra is None or extra:
            raise ConfigError(
                f"method config {path}: datasets.{dataset} may only set {sorted(DATASET_KEYS)}, got {override!r}"
            )
    return cfg


def select_stages(cfg: DictConfig, **names: str | None) -> DictConfig:
    """Apply `--predictor/--extractor/--refiner NAME`: a new name replaces that stage's section
    with the plugin's own defaults; the same name keeps the configured parameters."""
    for stage, name in names.items():
        if stage not in STAGES:
            raise ConfigError(f"unknown stage {stage!r}")
        if not name:
            continue
        if name == "null" and stage == "extractor":
            cfg[stage] = None
        elif cfg.get(stage) is None or cfg[stage].get("name") != name:
            cfg[stage] = {"name": name}
    return cfg


def split_overrides(dotlist: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split `key=value` overrides into method-level ones and final `protocol.*` ones."""
    method, protocol = [], []
    for item in dotlist:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. refiner.k=200)")
        (protocol if item.startswith("protocol.") else method).append(item)
    return method, protocol


def apply_overrides(cfg: DictConfig, dotlist: Iterable[str]) -> DictConfig:
    dotlist = list(dotlist)
    for item in dotlist:
        key = item.split("=", 1)[0]
        if key.split(".", 1)[0] not in METHOD_KEYS:
            raise ConfigError(f"override {item!r}: {key.split('.', 1)[0]!r} is not a method config key {sorted(METHOD_KEYS)}")
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
    except CONFIG_ERRORS as exc:
        raise ConfigError(f"cannot apply overrides {dotlist}: {' '.join(str(exc).split())}") from exc


def resolve_method(
    method: str | Path | None = None,
    overrides: Iterable[str] = (),
    *,
    predictor: str | None = None,
    extractor: str | None = None,
    refiner: str | None = None,
) -> tuple[DictConfig, list[str]]:
    """What the CLI and the Python API share: load a method, swap stages, apply `key=value` overrides.

    Returns the config and the `protocol.*` overrides, which apply last (after per-dataset values).
    A swapped stage is recorded in the method's name (`lposs_plus+sclip`) so run folders say so.
    """
    cfg = select_stages(load_method(method), predictor=predictor, extractor=extractor, refiner=refiner)
    method_overrides, protocol_overrides = split_overrides(overrides)
    cfg = apply_overrides(cfg, method_overrides)
    tags = [t for t in (predictor, extractor, refiner) if t]
    if tags and not any(o.startswith("name=") for o in method_overrides):
        cfg.name = f"{cfg.name}+{'+'.join(tags)}"
    return cfg, protocol_overrides


def stage_kwargs(section: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]] | None:
    if section is None:
        return None
    kwargs = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
    return kwargs.pop("name"), kwargs


def dataset_protocol(
    cfg: DictConfig, dataset: str | None = None, suite_protocol: Mapping | None = None, final: Iterable[str] = ()
) -> Protocol:
    """Merge the protocol layers for one dataset (see the module docstring for the order)."""
    layers = [dict(suite_protocol or {}), OmegaConf.to_container(cfg.protocol, resolve=True)]
    if dataset is not None and dataset in cfg.datasets and "protocol" in cfg.datasets[dataset]:
        layers.append(OmegaConf.to_container(cfg.datasets[dataset].protocol, resolve=True))
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    final = list(final)
    if final:
        try:
            merged.update(OmegaConf.to_container(OmegaConf.from_dotlist(final), resolve=True)["protocol"])
        except CONFIG_ERRORS as exc:
            raise ConfigError(f"cannot apply protocol overrides {final}: {exc}") from exc
    where = f"method {cfg.name}" + (f", dataset {dataset}" if dataset else "") + ": protocol"
    return Protocol.from_dict(merged, where=where)


def dataset_vocabulary(cfg: DictConfig, spec) -> Vocabulary:
    """A dataset's vocabulary: the method's class list (e.g. ClearCLIP's plain 'background') or the suite's.

    `shared_names` follow the class list they belong to: the method's `datasets.<name>.shared_names`
    if it sets them, else the suite's, unless the method replaced the classes (then none).
    """
    override = cfg.datasets.get(spec.name, {}) if spec.name in cfg.datasets else {}
    classes = override.get("classes")
    shared = override.get("shared_names")
    if shared is None:
        shared = spec.shared_names if classes is None else ()
    classes = spec.classes if classes is None else classes
    try:
        return Vocabulary(_plain(classes), _plain(shared))
    except ConfigError as exc:
        raise ConfigError(f"method {cfg.name}, dataset {spec.name}: {exc}") from exc


def _plain(value):
    """An omegaconf list as a Python list (other values unchanged)."""
    return OmegaConf.to_container(value) if isinstance(value, ListConfig) else value


class StageOptions:
    """Per-dataset stage options (`datasets.<name>.predictor` / `.refiner`), e.g. PGSeg's background
    thresholds or ResCLIP's per-dataset weights, applied through the stage's `configure(**options)`.

    Datasets without an override get the values the stage had when it was built, so one dataset's
    option never leaks into the next. Names the stage does not declare in `options` are refused when
    the method is loaded, before any dataset runs.
    """

    def __init__(self, cfg: DictConfig, stages: Mapping[str, Any]):
        from ovseg.pipeline.options import unknown_options

        self.cfg = cfg
        self.stages = stages
        self.defaults: dict[str, dict[str, Any]] = {}
        for stage, module in stages.items():
            keys = sorted({k for o in cfg.datasets.values() if stage in o for k in o[stage].keys()})
            if not keys:
                continue
            unknown_options(keys, module.options, f"method {cfg.name}: datasets.*.{stage} ({type(module).__name__})")
            self.defaults[stage] = {k: getattr(module, k) for k in keys}

    def apply(self, dataset: str) -> None:
        override = self.cfg.datasets.get(dataset, {}) if dataset in self.cfg.datasets else {}
        for stage, defaults in self.defaults.items():
            options = dict(defaults)
            if stage in override:
                options.update(OmegaConf.to_container(override[stage], resolve=True))
            self.stages[stage].configure(**options)


def build_segmenter(cfg: DictConfig | str | Path | None = None, protocol: Protocol | None = None):
    """Build a `Segmenter` from a method config (path, name or loaded config)."""
    if not isinstance(cfg, DictConfig):
        cfg = load_method(cfg)
    try:
        return _build_segmenter(cfg, protocol)
    except WeightsError as exc:
        raise WeightsError(f"method {cfg.name}: {exc}") from exc


def _build_segmenter(cfg: DictConfig, protocol: Protocol | None):
    from ovseg.pipeline.factory import build_extractor, build_predictor, build_refiner
    from ovseg.pipeline.segmenter import Segmenter

    name, kwargs = stage_kwargs(cfg.predictor)
    predictor = build_predictor(name, **kwargs)
    name, kwargs = stage_kwargs(cfg.refiner)
    refiner = build_refiner(name, **kwargs)
    extractor = None
    if refiner.needs_features:
        spec = stage_kwargs(cfg.extractor)
        if spec is None:
            raise ConfigError(
                f"refiner {cfg.refiner.name!r} needs a feature extractor but method {cfg.name!r} has none; "
                "pass --extractor dino (or set `extractor:` in the method config)"
            )
        extractor = build_extractor(spec[0], **spec[1])
    return Segmenter(predictor, refiner, extractor, protocol or dataset_protocol(cfg))
