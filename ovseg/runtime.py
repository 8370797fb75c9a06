"""Devices and numeric precision: one vocabulary, one place where weights are cast.

Every entry point (`ovseg bench`, `ovseg predict`, `load_segmenter`) uses these names and these two
functions, so a precision means the same thing everywhere:

- `32-true` (also `32`): float32 weights and arithmetic.
- `bf16-true` / `16-true`: the predictor's and the extractor's weights are cast to bfloat16 / float16
  (`place`). The refiner keeps float32: its solvers need the precision.
- `bf16-mixed` / `16-mixed`: float32 weights, the stages run under `torch.autocast` (`autocast`).

Stages take float32 images in [0, 1] and cast them to their own weights' dtype when they normalise
them (`ovseg.pipeline.patches.prepare_images`); every stage returns float32. That is the only input
cast; the weights cast is `place`.
"""

from __future__ import annotations

import contextlib

from .errors import ConfigError

#: numeric precisions a run may use (Lightning's names); free of torch so the CLI can list them
PRECISIONS = ("32-true", "32", "bf16-true", "bf16-mixed", "16-true", "16-mixed")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")

__all__ = ["PRECISIONS", "ACCELERATORS", "check_precision", "resolve_device", "place", "autocast", "module_device",
           "module_dtype"]


def check_precision(precision: str | None) -> str:
    """The precision name, or a ConfigError listing the valid ones."""
    precision = precision or "32-true"
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def _weight_dtype(precision: str):
    import torch

    return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(check_precision(precision))


def _autocast_dtype(precision: str):
    import torch

    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(check_precision(precision))


def resolve_device(accelerator: str | None):
    """`cpu`, `gpu`/`cuda`, `mps` or `auto` (a GPU when one is visible) as a torch device."""
    import torch

    if isinstance(accelerator, torch.device):
        return accelerator
    acc = (accelerator or "auto").lower()
    if acc == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if acc == "cpu":
        return torch.device("cpu")
    if acc in ("gpu", "cuda") or acc.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--accelerator {accelerator}: no CUDA GPU is visible; use --accelerator cpu or auto")
        return torch.device(acc if acc.startswith("cuda:") else "cuda")
    if acc == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError("--accelerator mps: Apple MPS is not available here; use --accelerator cpu or auto")
        return torch.device("mps")
    raise ConfigError(f"--accelerator must be one of {', '.join(ACCELERATORS)}, got {accelerator!r}")


def place(segmenter, device, precision: str = "32-true"):
    """Move a segmenter to `device` and, for `*-true` precisions, cast its predictor and extractor.

    The one place where weights change dtype. Sub-stages a predictor owns (a VFM) follow it.
    """
    dtype = _weight_dtype(precision)
    segmenter.to(device)
    if dtype is not None:
        for stage in (segmenter.predictor, segmenter.extractor):
            if stage is not None:
                stage.to(dtype)
    return segmenter


def autocast(device, precision: str):
    """The autocast context of a `*-mixed` precision on `device` (a no-op context otherwise)."""
    import torch

    dtype = _autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    device_type = device.type if isinstance(device, torch.device) else str(device)
    return torch.autocast(device_type=device_type, dtype=dtype)


def module_device(module):
    """Device of a module's first parameter or buffer (CPU for a module with neither)."""
    import torch

    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def module_dtype(module):
    """The floating dtype of a module's parameters (float32 for a module without parameters)."""
    import torch

    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
