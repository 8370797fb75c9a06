"""Weights for every plugin: reading checkpoint files, knowing when the network is out of reach, and
saying how to fix a missing file -- one implementation, so no two plugins disagree.

- `read_checkpoint(path)`: tensors of a `.safetensors`, TorchScript or `torch.save` file, read without
  running code (`weights_only=True`), unwrapped from the usual containers (`teacher`, `state_dict`,
  `model`) and stripped of `module.` (DDP) prefixes. A file that really pickles Python objects is read
  only when the caller trusts it; a damaged file is called damaged (never "pass trust=...").
- `offline_reason(hosts)`: why a download cannot work right now (`HF_HUB_OFFLINE`/`OVSEG_OFFLINE`, or no
  route to any host within 3 s), or None; with an HTTP(S) proxy configured the download is allowed to
  try, since the proxy may reach what a direct connection cannot.
- `fix_hint(option)`: the one sentence every weights error ends with.
"""

from __future__ import annotations

import argparse
import os
import socket
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .errors import WeightsError

__all__ = ["Checkpoint", "read_checkpoint", "offline_reason", "fix_hint", "RANDOM"]

#: the `pretrained` value that asks for seeded random weights (smoke tests)
RANDOM = "random"
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "OVSEG_OFFLINE")
PROBE_TIMEOUT_S = 3.0


def fix_hint(option: str = "predictor.pretrained") -> str:
    """How to get weights onto a machine: the sentence every weights error ends with."""
    return (
        "Fix: on a machine with network access run `ovseg download` with the same --method and overrides "
        f"(it fills the usual caches), or pass `{option}=/path/to/checkpoint`; `{option}=random` runs with random "
        "weights (a smoke test)."
    )


@dataclass
class Checkpoint:
    """The tensors of a checkpoint file and how they were stored."""

    tensors: dict
    path: Path
    torchscript: bool = False


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a `code/` folder or `constants.pkl`."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _first_line(exc: BaseException) -> str:
    """The reader's own reason, without torch's advice to switch off safe loading (wrong for damaged files)."""
    text = str(exc).strip()
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = text.split(marker, 1)[1].strip().split("\n\n")[0].strip()
        return f"unpickling failed: {detail}"
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _load(path: Path, trust: bool, untrusted_hint: str, safe_globals: Sequence[type]):
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu"), False
        except Exception as exc:  # noqa: BLE001 - any safetensors failure means a damaged file
            raise WeightsError(f"checkpoint {path} is not a readable safetensors file (damaged or truncated?): "
                               f"{_first_line(exc)}") from exc
    if _is_torchscript(path):
        try:
            return torch.jit.load(str(path), map_location="cpu").state_dict(), True
        except Exception as exc:  # noqa: BLE001
            raise WeightsError(f"checkpoint {path} is a TorchScript archive that does not load: {_first_line(exc)}") from exc
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(str(path), map_location="cpu", weights_only=True), False
    except Exception as exc:  # noqa: BLE001 - told apart below
        if "Unsupported global" not in str(exc):
            raise WeightsError(
                f"checkpoint {path} is not a readable PyTorch checkpoint (damaged, truncated, or not a checkpoint at "
                f"all): {_first_line(exc)}"
            ) from exc
        if not trust:
            names = sorted({part.split()[0].strip(":,.`") for part in str(exc).split("GLOBAL ")[1:]})
            raise WeightsError(
                f"checkpoint {path} pickles Python objects besides tensors ({', '.join(names) or 'unknown types'}), "
                f"which could run arbitrary code when loaded. {untrusted_hint}"
            ) from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False), False
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"checkpoint {path} does not load even fully unpickled: {_first_line(exc)}") from exc


def read_checkpoint(
    path: str | os.PathLike,
    *,
    trust: bool = False,
    unwrap: Iterable[str] = ("teacher", "state_dict", "model"),
    strip_prefixes: Iterable[str] = ("module.",),
    untrusted_hint: str = "If you trust the file, pass trust_checkpoint=true, or save its tensors alone once.",
    safe_globals: Sequence[type] = (argparse.Namespace,),
) -> Checkpoint:
    """The tensors stored in `path` (see the module docstring); WeightsError naming the file otherwise.

    `safe_globals`: harmless types a format pickles beside its tensors (DINO's training checkpoints keep
    their argparse `Namespace`).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist or is not a file")
    obj, torchscript = _load(path, trust, untrusted_hint, safe_globals)
    keys = tuple(unwrap)
    while isinstance(obj, Mapping) and any(isinstance(obj.get(k), Mapping) for k in keys):
        obj = next(obj[k] for k in keys if isinstance(obj.get(k), Mapping))
    import torch

    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"checkpoint {path} holds no state dict of tensors (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise WeightsError(f"checkpoint {path}: entries {bad[:5]} are not tensors (expected a state dict)")
    prefixes = tuple(strip_prefixes)
    tensors = {}
    for key, value in obj.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
        tensors[key] = value
    return Checkpoint(tensors, path, torchscript)


_REACHABLE: dict[str, bool] = {}


def _reachable(host: str, port: int = 443) -> bool:
    if (host, port) not in _REACHABLE:
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            _REACHABLE[host, port] = True
        except OSError:
            _REACHABLE[host, port] = False
    return _REACHABLE[host, port]


def offline_reason(hosts: Iterable[str]) -> str | None:
    """Why no host of `hosts` can be downloaded from right now, or None if one may be reached."""
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARIABLES):
        return "HF_HUB_OFFLINE or OVSEG_OFFLINE is set"
    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return None  # a proxy may reach the hosts where a direct connection cannot: let the download try
    hosts = [h for h in hosts if h]
    if not hosts or any(_reachable(h) for h in hosts):
        return None
    return f"this machine cannot reach {', '.join(hosts)}"
