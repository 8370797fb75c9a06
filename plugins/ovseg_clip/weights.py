"""Build an open_clip CLIP model from a tag, a checkpoint file or random weights.

Every way of failing to obtain or read weights ends in one `WeightsError` whose message says what
was tried and how to fix it, because evaluation machines are often offline and open_clip's own
errors (or hangs) there are hard to act on.

How `model` and `pretrained` interact:

* `pretrained="random"`: the open_clip config `model`, randomly initialised (seeded, so every
  process of a distributed run builds the same weights).
* `pretrained=<open_clip tag>` (`openai`, `laion2b_s34b_b88k`, ...): the file for that tag, found in
  the local cache or downloaded, is loaded into the config `model`. QuickGELU follows the tag
  (open_clip >= 3 only warns when `ViT-B-16` is paired with the QuickGELU `openai` weights).
* `pretrained=<path>`: a TorchScript archive (OpenAI's release format) or a plain state dict
  (`.pt/.pth/.bin`, optionally under a `state_dict` key, or `.safetensors`).
  - If its tensors fit the config `model` exactly, it is loaded into that config (an open_clip
    checkpoint, or OpenAI weights of that architecture); the activation is the config's
    (`ViT-B-16`: GELU, `ViT-B-16-quickgelu`: QuickGELU) unless `quick_gelu` says otherwise.
  - Otherwise, if it has the OpenAI CLIP layout, the architecture (width, depth, patch, grid,
    text tower) is read from the state dict, as open_clip's `build_model_from_openai_state_dict`
    does, with QuickGELU (OpenAI's activation) unless `quick_gelu=False`; `model` is then ignored.
  - A TorchScript archive is always OpenAI's format: architecture read from it, QuickGELU.
  OpenAI weights saved as a plain state dict of ViT-B/16 therefore need `model=ViT-B-16-quickgelu`
  (or `quick_gelu=True`), exactly as with open_clip itself.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import urlparse

import open_clip
import torch
from open_clip.model import (
    build_model_from_openai_state_dict,
    convert_to_custom_text_state_dict,
    resize_pos_embed,
    resize_text_pos_embed,
)

from ovseg.errors import ConfigError, WeightsError
from ovseg.pipeline.patches import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ovseg.weights import RANDOM, fix_hint, offline_reason, read_checkpoint

log = logging.getLogger(__name__)

_OPENAI_KEYS = ("visual.conv1.weight", "visual.proj", "visual.positional_embedding", "text_projection")
_EXTRA_OPENAI_KEYS = ("input_resolution", "context_length", "vocab_size")


#: ovseg's own open_clip architectures. `ovseg-tiny-vit` is a 2-layer, width-64 ViT-B/16 look-alike for
#: smoke tests and `configs/methods/tiny.yaml` (random weights only); `ovseg-tiny-vit-12` has ViT-B/16's 12
#: layers, for methods whose defaults index them (SC-CLIP, ResCLIP).
MODEL_CONFIGS: dict[str, dict] = {
    "ovseg-tiny-vit": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "ovseg-tiny-vit-12": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
}


def register_model_configs() -> None:
    """Make `MODEL_CONFIGS` known to open_clip (idempotent).

    open_clip's public `add_model_config` reads JSON files, so the configs are written to a
    temporary folder just for the call: kept in Python, they need no package data in a wheel.
    """
    missing = {k: v for k, v in MODEL_CONFIGS.items() if k not in open_clip.list_models()}
    if not missing:
        return
    with tempfile.TemporaryDirectory(prefix="ovseg-open-clip-configs-") as tmp:
        for name, cfg in missing.items():
            (Path(tmp) / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(tmp)  # read now; later rescans keep already-registered configs


@dataclass
class LoadedModel:
    model: torch.nn.Module  # open_clip CLIP, float32, eval mode
    tokenizer_name: str | None  # open_clip config name for `get_tokenizer`, None = default tokenizer
    source: str  # human-readable description of where the weights came from
    random_weights: bool
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN  # image normalisation the weights were trained with
    std: tuple[float, ...] = OPENAI_CLIP_STD


def _fix_hint() -> str:
    return fix_hint("predictor.pretrained")


# --------------------------------------------------------------------------------------------
# reading checkpoint files


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], bool]:
    """Tensors of a CLIP checkpoint file (via `ovseg.weights.read_checkpoint`) and whether it was TorchScript.

    OpenAI's archives carry three non-weight entries (input resolution, context length, vocabulary size),
    dropped here.
    """
    ckpt = read_checkpoint(path)
    sd = dict(ckpt.tensors)
    for key in _EXTRA_OPENAI_KEYS:
        sd.pop(key, None)
    return sd, ckpt.torchscript


def _is_openai_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    return all(k in sd for k in _OPENAI_KEYS) and any(k.startswith("transformer.resblocks.") for k in sd)


# --------------------------------------------------------------------------------------------
# building models


class _NoRandomInitWarning(logging.Filter):
    """open_clip logs "initialized randomly" on the root logger even when ovseg loads weights next."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def _create(model: str, quick_gelu: bool, **kwargs) -> torch.nn.Module:
    flt = _NoRandomInitWarning()
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        return open_clip.create_model(model, pretrained=None, force_quick_gelu=quick_gelu, **kwargs)
    finally:
        root.removeFilter(flt)


@contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _model_cfg(model: str) -> dict:
    register_model_configs()
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        import difflib

        close = difflib.get_close_matches(model, open_clip.list_models(), n=4)
        raise ConfigError(
            f"unknown open_clip model {model!r}"
            + (f"; did you mean {', '.join(map(repr, close))}?" if close else "")
            + " (`open_clip.list_models()` lists them; `ovseg-tiny-vit` is ovseg's tiny test model)"
        )
    return cfg


def create_random(model: str, quick_gelu: bool | None, seed: int = 0) -> torch.nn.Module:
    """The config `model` with seeded random weights (no file, no network)."""
    _model_cfg(model)
    with _seeded(seed):
        net = _create(model, bool(quick_gelu))
    return net


def _fits(model: str, sd: Mapping[str, torch.Tensor], quick_gelu: bool) -> bool:
    """Whether `sd` has exactly the tensors of config `model` (checked on the meta device: free)."""
    try:
        with torch.device("meta"):
            net = _create(model, quick_gelu, device="meta")
    except Exception:  # noqa: BLE001 - a config that cannot be built on meta is simply "no fit"
        return False
    sd = dict(sd)
    if "positional_embedding" in sd and not hasattr(net, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    expected = net.state_dict()
    if set(expected) != set(sd):
        return False
    return all(expected[k].shape == sd[k].shape or expected[k].numel() == sd[k].numel() for k in sd)


def _load_into_config(model: str, sd: dict[str, torch.Tensor], quick_gelu: bool) -> torch.nn.Module:
    net = _create(model, quick_gelu)
    if "positional_embedding" in sd and not hasattr(net, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    for key in ("logit_scale", "logit_bias"):
        param = getattr(net, key, None)
        if key in sd and param is not None and sd[key].ndim != param.ndim:
            sd[key] = sd[key].reshape(param.shape)
    resize_pos_embed(sd, net)
    resize_text_pos_embed(sd, net)
    net.load_state_dict(sd, strict=True)
    return net


def build_from_state_dict(
    sd: dict[str, torch.Tensor], model: str, quick_gelu: bool | None, torchscript: bool, where: str
) -> tuple[torch.nn.Module, str | None, str]:
    """Model, tokenizer config name and a description, following the rules in the module docstring."""
    if not torchscript and open_clip.get_model_config(model) is not None:
        default_qg = bool(_model_cfg(model).get("quick_gelu", False))
        qg = default_qg if quick_gelu is None else bool(quick_gelu)
        if _fits(model, sd, qg):
            try:
                net = _load_into_config(model, sd, qg)
            except Exception as exc:  # noqa: BLE001
                raise WeightsError(f"{where} fits {model} but failed to load: {exc}") from exc
            return net, model, f"{where} into {model}{' (QuickGELU)' if qg else ''}"
    if _is_openai_layout(sd):
        if not any(k.startswith("visual.transformer.resblocks.") for k in sd):
            raise ConfigError(
                f"{where} is a CLIP checkpoint whose image tower is not a ViT (a ResNet?); the "
                "dense methods change the last transformer block and need a ViT"
            )
        qg = True if quick_gelu is None else bool(quick_gelu)
        try:
            net = build_model_from_openai_state_dict(dict(sd), quick_gelu=qg, cast_dtype=None)
        except Exception as exc:  # noqa: BLE001
            raise WeightsError(
                f"{where} has the OpenAI CLIP layout but its architecture could not be built from it: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            ) from exc
        v = net.visual
        arch = (
            f"ViT width {v.conv1.out_channels}, {len(v.transformer.resblocks)} layers, "
            f"patch {v.patch_size[0]}, grid {v.grid_size[0]}x{v.grid_size[1]}"
        )
        return net, None, f"{where} (OpenAI format, architecture read from the checkpoint: {arch}{', QuickGELU' if qg else ''})"
    sample = ", ".join(list(sd)[:5])
    raise WeightsError(
        f"{where} is not a CLIP checkpoint for {model!r}: its tensors neither fit that open_clip config nor "
        f"have the OpenAI CLIP layout (keys {', '.join(_OPENAI_KEYS)}); first keys: {sample}"
    )


# --------------------------------------------------------------------------------------------
# resolving open_clip tags without hanging offline


def _hf_candidates(hf_hub: str) -> tuple[str, list[str]]:
    """Repository and file names open_clip's `download_pretrained_from_hf` would try, safetensors first."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo, filename = os.path.split(hf_hub)
    filename = filename or HF_WEIGHTS_NAME
    if filename == HF_WEIGHTS_NAME:
        return repo, [HF_SAFE_WEIGHTS_NAME, filename]
    if filename.endswith((".bin", ".pth")):
        return repo, [filename[:-4] + ".safetensors", filename]
    return repo, [filename]


def _cached_file(cfg: Mapping, cache_dir: str | None) -> str | None:
    """The tag's file if it is already on disk (HF cache or open_clip's URL cache)."""
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    if cfg.get("hf_hub"):
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            hf_hub_download = None
        if hf_hub_download is not None:
            repo, names = _hf_candidates(cfg["hf_hub"])
            for name in names:
                try:
                    return hf_hub_download(repo_id=repo, filename=name, cache_dir=cache_dir, local_files_only=True)
                except Exception:  # noqa: BLE001 - not cached under this name
                    continue
    if cfg.get("url"):
        target = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        if os.path.isfile(target):
            return target
    return None


def resolve_tag(model: str, tag: str, cache_dir: str | None) -> str:
    """Local path of the checkpoint for open_clip tag `tag` of `model`, downloading it if possible."""
    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise WeightsError(
            f"pretrained={tag!r} is neither an open_clip tag of {model!r} (known tags: "
            f"{', '.join(tags) or 'none'}) nor an existing file. "
            + _fix_hint()
        )
    found = _cached_file(cfg, cache_dir)
    if found:
        return found
    hosts = ["huggingface.co"] if cfg.get("hf_hub") else []
    if cfg.get("url"):
        hosts.append(urlparse(cfg["url"]).hostname or "")
    where = cache_dir or "the Hugging Face / ~/.cache/clip caches"
    reason = offline_reason(hosts)
    if reason is not None:
        raise WeightsError(f"{model} weights {tag!r} are not in {where} and this machine is offline ({reason}). "
                           + _fix_hint())
    try:
        from open_clip.pretrained import download_pretrained

        path = download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(
            f"downloading {model} weights {tag!r} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            + _fix_hint()
        ) from exc
    if not path or not os.path.isfile(path):
        raise WeightsError(f"open_clip returned no file for {model}/{tag}. " + _fix_hint())
    return path


# --------------------------------------------------------------------------------------------


def _load_pretrained(model: str, pretrained: str, quick_gelu: bool | None, cache_dir: str | None):
    is_file = os.path.exists(pretrained)
    is_tag = not is_file and bool(open_clip.get_pretrained_cfg(model, pretrained))
    looks_like_path = os.sep in pretrained or pretrained.startswith(".") or Path(pretrained).suffix != ""
    if looks_like_path and not is_file and not is_tag:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise WeightsError(
            f"checkpoint {pretrained!r} does not exist (and it is not an open_clip tag of {model!r}; "
            f"known tags: {', '.join(tags) or 'none'})"
        )
    if is_file:
        sd, ts = read_state_dict(pretrained)
        net, tok, desc = build_from_state_dict(sd, model, quick_gelu, ts, repr(pretrained))
        return LoadedModel(net, tok, desc, False)
    _model_cfg(model)
    path = resolve_tag(model, pretrained, cache_dir)
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
    qg = bool(tag_cfg.get("quick_gelu", False)) if quick_gelu is None else quick_gelu
    sd, ts = read_state_dict(path)
    net, tok, desc = build_from_state_dict(sd, model, qg, ts, f"{model}/{pretrained} ({path})")
    mean = tuple(tag_cfg.get("mean", OPENAI_CLIP_MEAN))
    std = tuple(tag_cfg.get("std", OPENAI_CLIP_STD))
    return LoadedModel(net, tok, desc, False, mean, std)


def load_clip(
    model: str,
    pretrained: str,
    *,
    quick_gelu: bool | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Resolve `pretrained` (tag, path or "random") into a float32 eval-mode open_clip model."""
    register_model_configs()
    if not isinstance(pretrained, (str, os.PathLike)) or not str(pretrained):
        raise ConfigError(f"pretrained must be an open_clip tag, a checkpoint path or 'random', got {pretrained!r}")
    pretrained = str(pretrained)
    if pretrained == RANDOM:
        net = create_random(model, quick_gelu, seed)
        loaded = LoadedModel(net, model, f"{model} with random weights (seed {seed})", True)
    else:
        try:
            loaded = _load_pretrained(model, pretrained, quick_gelu, cache_dir)
        except WeightsError as exc:
            if "Fix:" in str(exc):
                raise
            if os.path.isfile(pretrained):  # the user's own file: downloading would not help
                raise WeightsError(f"{exc}. Check or re-copy that file, or pass another `predictor.pretrained`.") from (
                    exc.__cause__ or exc)
            raise WeightsError(f"{exc}. {_fix_hint()}") from (exc.__cause__ or exc)
    loaded.model = loaded.model.float().eval().requires_grad_(False)
    log.info("CLIP weights: %s", loaded.source)
    return loaded
