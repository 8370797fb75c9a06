"""Class vocabulary with synonyms.

A class is a string of comma-separated synonyms (`"person, person in shirt"`) or a list of names.
Every name is its own query (Q names in class-major order); `reduce` maps per-name scores back to
classes by the max over each class's names, as SCLIP/LPOSS do.

A name may belong to only one class, which catches copy-paste slips in class lists. The reference
class files break that rule once on purpose: SCLIP, NACLIP and LPOSS list `bed` both as a COCO-Object
background synonym and as class 60. Listing such a name in `shared_names` keeps every occurrence as
its own query, exactly as those codes do: the duplicate takes part in the softmax over names, and
since both queries score the same, the argmax tie goes to the first class.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ovseg.errors import ConfigError

__all__ = ["Vocabulary"]


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
    """Classes, each with one or more names (synonyms); `shared_names` may appear in several classes."""

    def __init__(self, classes: Sequence, shared_names: Iterable[str] = ()):
        if isinstance(classes, str) or classes is None:
            raise ConfigError("classes must be a list of class entries, not a single string")
        if isinstance(shared_names, str):
            raise ConfigError(f"shared_names must be a list of names, not the string {shared_names!r}")
        classes = list(classes)
        if not classes:
            raise ConfigError("the class list is empty")
        self.class_names: list[list[str]] = [_split(item, i) for i, item in enumerate(classes)]
        self.shared_names: tuple[str, ...] = tuple(dict.fromkeys(n.strip() for n in shared_names))
        owners: dict[str, list[int]] = {}
        for c, names in enumerate(self.class_names):
            for n in dict.fromkeys(names):
                owners.setdefault(n, []).append(c)
        for n, cs in owners.items():
            if len(cs) > 1 and n not in self.shared_names:
                raise ConfigError(
                    f"name {n!r} appears in class {cs[0]} ({self.class_names[cs[0]][0]!r}) and class {cs[1]} "
                    f"({self.class_names[cs[1]][0]!r}); each name must belong to one class, unless it is listed "
                    f"in shared_names (as the reference COCO-Object files need for 'bed')"
                )
        unused = [n for n in self.shared_names if len(owners.get(n, ())) < 2]
        if unused:
            raise ConfigError(f"shared_names {unused} must each appear in at least two classes")
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
