"""`check_dataset`: is a suite's dataset there and well-formed? Runs no model (`ovseg data check`)."""

from __future__ import annotations

from dataclasses import dataclass

from ovseg.errors import DatasetError
from .base import MissingDataError


@dataclass(frozen=True)
class DatasetStatus:
    name: str
    #: "found", "missing" (folder / split file / hub id / data root absent) or "malformed"
    status: str
    #: why it is missing or malformed (naming the file); for "found", what was checked
    reason: str | None = None
    num_samples: int | None = None
    checked: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "found"


#: the words `ovseg data check` and `ovseg bench` use for a dataset that cannot be evaluated
MISSING, MALFORMED = "missing", "malformed"


def problem_kind(exc: DatasetError) -> str:
    """`missing` when the data is not there at all, `malformed` when it is there but unusable."""
    return MISSING if isinstance(exc, MissingDataError) else MALFORMED


def _sample_indices(n: int, k: int) -> list[int]:
    """Up to k indices spread over [0, n), first and last included."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def check_dataset(spec, data_root=None, deep: bool = False, sample: int = 5) -> DatasetStatus:
    """Build `spec`'s dataset and read `sample` spread samples (every sample when `deep`).

    Reading a sample decodes the image and the label and applies every validation (readable files,
    equal sizes, label values in range), so a "found" dataset will not fail on those samples later.
    """
    try:
        dataset = spec.build(data_root)
    except DatasetError as exc:
        return DatasetStatus(spec.name, problem_kind(exc), str(exc))
    n = len(dataset)
    indices = list(range(n)) if deep else _sample_indices(n, sample)
    for i in indices:
        try:
            dataset[i]
        except DatasetError as exc:
            return DatasetStatus(spec.name, MALFORMED, str(exc), n, indices.index(i) + 1)
    checked = "all checked" if deep else f"{len(indices)} checked"
    return DatasetStatus(spec.name, "found", f"{n} samples ({checked})", n, len(indices))
