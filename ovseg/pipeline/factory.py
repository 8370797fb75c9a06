"""Build a stage by its registered name: plugin lookup (`ovseg.registry`), type check, option check."""

from __future__ import annotations

import inspect
from typing import Any

from ovseg.errors import ConfigError, PluginError
from ovseg import registry

from .options import unknown_options

__all__ = ["build_predictor", "build_extractor", "build_refiner"]


def _build(kind: str, base: type, name: str, cfg: dict[str, Any]):
    cls = registry.load_plugin(kind, name)  # looked up at call time, so tests can patch it
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginError(
            f"{kind} plugin {name!r} resolves to {cls!r}, which is not a subclass of ovseg.stages.{base.__name__}"
        )
    signature = inspect.signature(cls)
    try:
        signature.bind(**cfg)
    except TypeError as exc:
        params = signature.parameters.values()
        if not any(p.kind is p.VAR_KEYWORD for p in params):  # name only the keys it lacks, with a close match
            known = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            try:
                unknown_options(cfg, known, f"{kind} {name!r}")
            except ConfigError as unknown:
                raise PluginError(str(unknown)) from exc
        raise PluginError(f"{kind} {name!r} does not accept the options {sorted(cfg)}: {exc}") from exc
    try:
        return cls(**cfg)
    except TypeError as exc:
        # nn.Module.__init__(*args, **kwargs) hides a plugin without its own __init__ from the check above
        if "unexpected keyword argument" not in str(exc):
            raise
        raise PluginError(f"{kind} {name!r} does not accept the options {sorted(cfg)}: {exc}") from exc


def build_predictor(name: str, **cfg: Any):
    """Build the VLM predictor registered as `name` with keyword configuration `cfg`."""
    from .stages import VLMPredictor

    return _build("predictor", VLMPredictor, name, cfg)


def build_extractor(name: str, **cfg: Any):
    """Build the feature extractor registered as `name`."""
    from .stages import FeatureExtractor

    return _build("extractor", FeatureExtractor, name, cfg)


def build_refiner(name: str, **cfg: Any):
    """Build the refiner registered as `name`."""
    from .stages import Refiner

    return _build("refiner", Refiner, name, cfg)
