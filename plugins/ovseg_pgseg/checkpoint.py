"""Reading released GroupViT / PGSeg checkpoints safely and mapping their keys onto this port.

The releases are `torch.save` dicts: `model` (the state dict of the whole two-tower model, keys
`img_encoder.*`, `text_encoder.*`, `img_projector.*`, `text_projector.*`, `logit_scale`), plus
optimizer and scheduler states, metrics, the epoch and the training `config`, a pickled OmegaConf
object. Files are read with `torch.load(weights_only=True)`; a file that needs arbitrary unpickling
is refused unless the caller trusts it (`trust=True`), or it can be converted once into a
tensors-only file with::

    python -m ovseg_pgseg.checkpoint pgseg.pth pgseg_weights.pth --trust

Keys of training-only modules (PGSeg's text prototypes and image-text matching head, the multi-label
temperature) are dropped; every other key must match the model exactly.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from torch import nn

from ovseg.errors import WeightsError
from ovseg.weights import read_checkpoint as _read

#: release key prefix -> this port's, first match wins
_RENAMES = tuple(
    (re.compile(pattern), repl)
    for pattern, repl in (
        (r"^img_encoder\.layers\.(\d+)\.downsample_spatial\.", r"visual.stages.\1.prototypes."),
        (r"^img_encoder\.layers\.(\d+)\.downsample\.", r"visual.stages.\1.grouping."),
        (r"^img_encoder\.layers\.", "visual.stages."),
        (r"^img_encoder\.", "visual."),
        (r"^text_encoder\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", r"text.blocks.\1.attn.in_proj.\2"),
        (r"^text_encoder\.transformer\.resblocks\.", "text.blocks."),
        (r"^text_encoder\.", "text."),
        (r"^img_projector\.", "visual_proj."),
        (r"^text_projector\.", "text_proj."),
        (r"^logit_scale$", "logit_scale"),
    )
)

#: modules that only serve training losses: present in the releases, unused at inference
_TRAINING_ONLY = re.compile(
    r"^(img_encoder\.mapping_text\.|img_encoder\.logit_scale$|text_encoder\.Atten\.|multi_label_logit_scale$)"
)


def read_checkpoint(path: str | Path, *, trust: bool = False) -> dict[str, torch.Tensor]:
    """The model state dict stored in `path` (a release `.pth`, a bare state dict or `.safetensors`).

    Read by `ovseg.weights.read_checkpoint`: `WeightsError` when the file is missing or damaged, or when
    it pickles Python objects besides tensors and `trust` is False.
    """
    return _read(path, trust=trust, untrusted_hint=(
        "The releases store their training config this way. If you trust the file, pass trust_checkpoint=True, "
        f"or convert it once with `python -m ovseg_pgseg.checkpoint {path} OUT.safetensors --trust`."
    )).tensors


def convert_release_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename release keys to this port's module names; returns (converted, unrecognised keys).

    Training-only keys are dropped silently; a key matching no rule is reported, not guessed.
    """
    converted, unknown = {}, []
    for key, value in state.items():
        if _TRAINING_ONLY.match(key):
            continue
        for pattern, repl in _RENAMES:
            if pattern.match(key):
                converted[pattern.sub(repl, key, count=1)] = value
                break
        else:
            unknown.append(key)
    return converted, unknown


def _listing(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_release_weights(model: nn.Module, path: str | Path, *, trust: bool = False, kind: str = "pgseg") -> None:
    """Load a release checkpoint into `model` (a `GroupViTModel`), all keys matched exactly.

    Any missing, unexpected or mis-shaped key raises `WeightsError` naming the keys and, when the
    file looks like the other model family (NPR weights present or absent), the predictor to use.
    """
    state, unknown = convert_release_keys(read_checkpoint(path, trust=trust))
    own = model.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape
    ]
    # running-batch counters are bookkeeping; files written without them load fine
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = unknown + [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        problems = []
        if mismatched:
            problems.append(f"shape mismatches (checkpoint vs model): {_listing(mismatched)}")
        if missing:
            problems.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_listing(unexpected)}")
        has_npr = any(".prototypes." in k for k in state)
        wants_npr = any(".prototypes." in k for k in own)
        hint = ""
        if has_npr != wants_npr:
            hint = " It looks like a " + ("PGSeg" if has_npr else "GroupViT") + " checkpoint: use the " + (
                "pgseg" if has_npr else "groupvit"
            ) + " predictor."
        elif mismatched:
            hint = " Pass the architecture options (embed_dim, depths, ...) that match the checkpoint."
        raise WeightsError(f"checkpoint {path} does not fit the {kind} model: " + "; ".join(problems) + "." + hint)
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)


def strip_checkpoint(src: str | Path, dst: str | Path, *, trust: bool = False) -> Path:
    """Write the model weights of `src` alone to `dst` (`.safetensors`, or a tensors-only `torch.save`).

    The result loads with `weights_only=True`; keys keep the release layout.
    """
    state = read_checkpoint(src, trust=trust)
    dst = Path(dst).expanduser()
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(dst))
    else:
        torch.save({"model": state}, dst)
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ovseg_pgseg.checkpoint",
        description="Keep only the model weights of a GroupViT/PGSeg release checkpoint (drops the pickled config).",
    )
    parser.add_argument("src", help="release checkpoint (.pth)")
    parser.add_argument("dst", help="output file: .safetensors or .pth")
    parser.add_argument("--trust", action="store_true", help="unpickle SRC fully (only for files you trust)")
    args = parser.parse_args(argv)
    try:
        out = strip_checkpoint(args.src, args.dst, trust=args.trust)
    except WeightsError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
