"""Prompt templates for text embeddings.

`imagenet80` are the 80 ImageNet templates of OpenAI's CLIP notebook, used by SCLIP, ClearCLIP,
NACLIP, ProxyCLIP and LPOSS; open_clip ships them, so they are taken from there rather than copied.
"""

from __future__ import annotations

from typing import Callable, Sequence

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from ovseg.errors import ConfigError

Template = Callable[[str], str]

TEMPLATES: dict[str, Sequence[Template]] = {
    "imagenet80": tuple(OPENAI_IMAGENET_TEMPLATES),
    "single": (lambda c: f"a photo of a {c}.",),
}


def get_templates(name: str) -> Sequence[Template]:
    """Template set by name; a ConfigError lists the known ones."""
    if name not in TEMPLATES:
        raise ConfigError(f"unknown templates {name!r}; expected one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]
