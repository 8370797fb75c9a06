"""Where ovseg finds its YAML configs and caches data.

Configs live in the repository's top-level `configs/` (the project layout), reached through the
`ovseg/configs` link; a wheel carries them as package data at the same place. `OVSEG_CONFIG_DIR`
overrides it. Generated data (the demo suite) goes to `OVSEG_CACHE` or `~/.cache/ovseg`.
"""

import os
from pathlib import Path


def config_dir() -> Path:
    env = os.environ.get("OVSEG_CONFIG_DIR")
    return Path(env) if env else (Path(__file__).parent / "configs").resolve()


def cache_dir() -> Path:
    env = os.environ.get("OVSEG_CACHE")
    path = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ovseg"
    return path


def data_root() -> Path | None:
    """Folder holding prepared benchmark datasets (`--data-root` or `OVSEG_DATA_ROOT`)."""
    env = os.environ.get("OVSEG_DATA_ROOT")
    return Path(env) if env else None
