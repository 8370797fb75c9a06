"""Class vocabulary with synonyms.

A class is a string of comma-separated synonyms (`"person, person in shirt"`) or a list of names.
Every name is its own query (Q names in class-major order); `reduce` maps per-name scores back to
classes by the max over each class's names, as SCLIP/LPOSS do.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .errors import ConfigError


def _split(item, index: int) -> list[str]:
    if isinstance(item, str):
        names = [n.strip() for n in item.split(",")]
    elif isinstance(item, Sequence) and all(isinstance(n, str) for n in item):
        names = [n.strip() for n in item]
    else:
        raise ConfigError(f"class {index} must be a string or a list of strings, got {item!r}")
    if not names or any(not n for n in names):
        raise ConfigError(f"class {index} ({item!r}) has an empty name")
    return names


class Vocabulary:
    """Classes, each with one or more names (synonyms)."""

    def __init__(self, classes: Sequence):
        if isinstance(classes, str) or classes is None:
            raise ConfigError("classes must be a list of class entries, not a single string")
        classes = list(classes)
        if not classes:
            raise ConfigError("the class list is empty")
        self.class_names: list[list[str]] = [_split(item, i) for i, item in enumerate(classes)]
        owner: dict[str, int] = {}
        for c, names in enumerate(self.class_names):
            for n in names:
                if n in owner and owner[n] != c:
                    raise ConfigError(
                        f"name {n!r} appears in class {owner[n]} ({self.class_names[owner[n]][0]!r}) "
                        f"and class {c} ({names[0]!r}); each name must belong to one class"
                    )
                owner[n] = c
        # duplicate synonyms inside one class are harmless: keep the first occurrence
        self.class_names = [list(dict.fromkeys(names)) for names in self.class_names]
        self.names: list[str] = [n for names in self.class_names for n in names]
        self.name_to_class = torch.tensor(
            [c for c, names in enumerate(self.class_names) for _ in names], dtype=torch.long
        )

    @classmethod
    def parse(cls, text: str) -> "Vocabulary":
        """Parse the CLI form: classes separated by ';', synonyms by ','."""
        return cls([item for item in (t.strip() for t in text.split(";")) if item] or [])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def display_names(self) -> list[str]:
        """First name of each class, for legends and tables."""
        return [names[0] for names in self.class_names]

    def __len__(self) -> int:
        return self.num_classes

    def __repr__(self) -> str:
        return f"Vocabulary({self.num_classes} classes, {len(self.names)} names)"

    def reduce(self, scores: torch.Tensor) -> torch.Tensor:
        """(Q, ...) per-name scores to (C, ...) by the max over each class's names."""
        if scores.shape[0] != len(self.names):
            raise ValueError(f"scores have {scores.shape[0]} rows, the vocabulary has {len(self.names)} names")
        if len(self.names) == self.num_classes:
            return scores
        index = self.name_to_class.to(scores.device).view(-1, *([1] * (scores.ndim - 1))).expand_as(scores)
        out = torch.full((self.num_classes, *scores.shape[1:]), float("-inf"), dtype=scores.dtype, device=scores.device)
        return out.scatter_reduce(0, index, scores, reduce="amax", include_self=True)
