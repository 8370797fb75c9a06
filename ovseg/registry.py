"""Plugin registry over Python entry points.

First-party and third-party plugins register the same way: an entry point in one of the groups
below whose value is the plugin class (or, for suites, a callable returning the suite's YAML path).
Loading is lazy: listing plugins reads only distribution metadata, and a plugin module is imported
when it is first built, so `import ovseg` never imports torch models.
"""

from __future__ import annotations

import difflib
import importlib.metadata as metadata
from dataclasses import dataclass
from typing import Any

from .errors import PluginError

GROUPS = {
    "predictor": "ovseg.predictors",
    "extractor": "ovseg.extractors",
    "refiner": "ovseg.refiners",
    "suite": "ovseg.suites",
}


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    value: str
    distribution: str
    version: str


def _entry_points(kind: str) -> dict[str, metadata.EntryPoint]:
    if kind not in GROUPS:
        raise PluginError(f"unknown plugin kind {kind!r}; expected one of {sorted(GROUPS)}")
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=GROUPS[kind]):
        previous = found.get(ep.name)
        if previous is not None and previous.value != ep.value:
            raise PluginError(
                f"two {kind} plugins are registered as {ep.name!r}: {previous.value} and {ep.value}; "
                "uninstall one of the distributions"
            )
        found[ep.name] = ep
    return found


def list_plugins(kind: str | None = None) -> dict[str, list[PluginInfo]]:
    """Registered plugins by kind (without importing them)."""
    kinds = [kind] if kind else list(GROUPS)
    out: dict[str, list[PluginInfo]] = {}
    for k in kinds:
        infos = []
        for name, ep in sorted(_entry_points(k).items()):
            dist = getattr(ep, "dist", None)
            infos.append(
                PluginInfo(k, name, ep.value, dist.name if dist else "?", dist.version if dist else "?")
            )
        out[k] = infos
    return out


def load_plugin(kind: str, name: str) -> Any:
    """Import and return the object registered as `name` in the group of `kind`."""
    eps = _entry_points(kind)
    if name not in eps:
        close = difflib.get_close_matches(name, eps, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise PluginError(
            f"unknown {kind} {name!r}. Registered {kind}s: {', '.join(sorted(eps)) or '(none)'}.{hint}"
        )
    ep = eps[name]
    try:
        obj = ep.load()
    except Exception as exc:  # noqa: BLE001 - any import failure is reported by plugin name
        raise PluginError(
            f"{kind} plugin {name!r} ({ep.value}) failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    return obj
