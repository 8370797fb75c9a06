"""Finding and loading DINO / DINOv2 checkpoints for timm ViTs, failing fast with one clear message.

`pretrained` may be True (the timm hub weights of the model name's tag), a timm tag, a local
checkpoint path (timm, original DINO or original DINOv2 format; `.pth`/`.bin` or `.safetensors`) or
"random". Hub weights come from the local Hugging Face cache (or the torch hub cache, where the
authors' `torch.hub.load('facebookresearch/dino:main', ...)` leaves them) and are downloaded only
when the Hub answers: without network the error comes in seconds, not after a minute of retries.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from ovseg.errors import WeightsError

RANDOM = "random"
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")
_PROBE_TIMEOUT_S = 3.0


def _fix_hint() -> str:
    return (
        "Fix: run `ovseg download` with the same --method and overrides on a connected machine and copy its "
        "Hugging Face cache here, or set `extractor.pretrained=/path/to/checkpoint.pth`."
    )


def local_file(path: str) -> str:
    """`path` with `~` expanded, if it is a file."""
    full = os.path.expanduser(path)
    if not os.path.isfile(full):
        raise WeightsError(f"checkpoint file {path!r} does not exist. {_fix_hint()}")
    return full


def hub_name(arch: str, tag: str | None, pretrained: Any, default_tag: str) -> str:
    """The timm `arch.tag` name that `pretrained` asks for (True -> the name's tag or `default_tag`)."""
    if pretrained is True or pretrained in ("default", "hub", "timm"):
        return f"{arch}.{tag or default_tag}"
    return f"{arch}.{pretrained}"


def looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.endswith((".pth", ".pt", ".bin", ".safetensors", ".ckpt"))


def resolve_hub_file(name: str) -> str:
    """Local path of the hub checkpoint of timm model `name` (cached, or downloaded if the Hub answers)."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise WeightsError(f"timm has no pretrained weights named {name!r}. {_fix_hint()}")
    tried = []
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo = cfg.hf_hub_id.split("@")[0]
        for filename in ((cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HUB_FILES):
            path = try_to_load_from_cache(repo, filename)
            if isinstance(path, str):
                return path
        tried.append(f"the Hugging Face cache ({repo})")
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if path.is_file():
            return str(path)
        tried.append(f"the torch hub cache ({path})")
    reason = _offline_reason()
    if reason is None and cfg.hf_hub_id:
        from huggingface_hub import hf_hub_download

        errors = []
        for filename in ((cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HUB_FILES):
            try:
                return hf_hub_download(cfg.hf_hub_id.split("@")[0], filename)
            except Exception as exc:  # noqa: BLE001 - reported below with what was tried
                errors.append(f"{filename}: {type(exc).__name__}: {exc}")
        reason = "the download failed (" + "; ".join(errors)[:400] + ")"
    raise WeightsError(
        f"cannot load pretrained weights {name!r}: not found in {' or '.join(tried)}, and {reason}. "
        f"{_fix_hint()}"
    )


def _offline_reason() -> str | None:
    """Why the Hub cannot be reached right now, or None if it may be (a quick TCP probe, no retries)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("OVSEG_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE/OVSEG_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # a proxy may reach the Hub where a direct connection cannot: let the download try
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"{host} is unreachable ({exc.strerror or exc})"
    return None


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a local file, read safely (`weights_only=True` or safetensors)."""
    if not os.path.isfile(path):
        raise WeightsError(f"checkpoint file {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj: Any = load_file(path, device="cpu")
        else:
            # DINO "full" checkpoints also pickle their argparse Namespace; allow it and nothing else
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(
            f"cannot read checkpoint {path!r} safely (weights_only=True): {type(exc).__name__}: {exc}"
        ) from exc
    for key in ("teacher", "state_dict", "model"):  # DINO training checkpoints keep the teacher
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"checkpoint {path!r} does not hold a state dict of tensors")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def load_into(vit: nn.Module, path: str, what: str) -> None:
    """Load a checkpoint file into a timm VisionTransformer; a head in the file is ignored."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        state = checkpoint_filter_fn(read_checkpoint(path), vit)
        result = vit.load_state_dict(state, strict=False)
    except WeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - shape mismatches and conversion failures
        raise WeightsError(f"checkpoint {path!r} does not fit {what}: {type(exc).__name__}: {exc}") from exc
    unexpected = [k for k in result.unexpected_keys if not k.startswith(("head.", "fc_norm.", "head_drop."))]
    if result.missing_keys or unexpected:
        raise WeightsError(
            f"checkpoint {path!r} does not fit {what}: missing {result.missing_keys[:5]}, "
            f"unexpected {unexpected[:5]} (of {len(result.missing_keys)} missing, {len(unexpected)} unexpected)"
        )
