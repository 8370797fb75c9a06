"""Finding and loading DINO / DINOv2 checkpoints for timm ViTs, failing fast with one clear message.

`pretrained` may be True (the timm hub weights of the model name's tag), a timm tag, a local
checkpoint path (timm, original DINO or original DINOv2 format; `.pth`/`.bin` or `.safetensors`) or
"random". Hub weights come from the local Hugging Face cache (or the torch hub cache, where the
authors' `torch.hub.load('facebookresearch/dino:main', ...)` leaves them) and are downloaded only
when the Hub answers: without network the error comes in seconds, not after a minute of retries.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from ovseg.errors import WeightsError
from ovseg.weights import RANDOM, fix_hint, offline_reason, read_checkpoint

__all__ = ["RANDOM", "local_file", "hub_name", "looks_like_path", "resolve_hub_file", "load_into"]

_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def _fix_hint() -> str:
    return fix_hint("extractor.pretrained")


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
    reason = _offline_reason() if cfg.hf_hub_id else "timm has no Hugging Face Hub copy of it to download"
    if reason is None:
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
    """Why the Hugging Face Hub cannot be reached right now (`ovseg.weights.offline_reason`), or None."""
    from huggingface_hub import constants

    return offline_reason([urlparse(constants.ENDPOINT).hostname or "huggingface.co"])


def load_into(vit: nn.Module, path: str, what: str) -> None:
    """Load a checkpoint file into a timm VisionTransformer; a head in the file is ignored."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        tensors = read_checkpoint(path, strip_prefixes=("module.", "backbone."), untrusted_hint=(
            "Only if you trust the file: load it with torch.load(weights_only=False) and save its state dict alone."
        )).tensors
        state = checkpoint_filter_fn(tensors, vit)
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
