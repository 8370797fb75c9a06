"""The map-style dataset every source returns, and the error for data that is not there."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.utils.data import Dataset

from ovseg.errors import DatasetError
from .conventions import LabelConventions
from .io import image_tensor, label_array


class MissingDataError(DatasetError):
    """The dataset (folder, split file, hub id, data root) is not there at all, as opposed to malformed."""


class SegmentationDataset(Dataset):
    """Samples `{"image": uint8 (3, H, W) RGB, "label": int64 (H, W), "name": str, "path": str}`.

    Subclasses list their items and implement `_load(index) -> (image, label, name, image_where,
    label_where)` returning anything `io.image_tensor` / `io.label_array` accept; decoding, label
    conventions and validation happen here, the same way for every source.
    """

    def __init__(self, conventions: LabelConventions):
        self.conventions = conventions

    @property
    def num_classes(self) -> int:
        return self.conventions.num_classes

    @property
    def ignore_index(self) -> int:
        return self.conventions.ignore_index

    def _load(self, index: int) -> tuple[Any, Any, str, str, str]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        image, label, name, image_where, label_where = self._load(index % len(self))
        with _names_file(image_where):
            image = image_tensor(image, image_where)
        with _names_file(label_where):
            raw = label_array(label, label_where)
            if tuple(raw.shape) != tuple(image.shape[1:]):
                raise DatasetError(
                    f"{label_where}: label size {raw.shape[1]}x{raw.shape[0]} (WxH) differs from its image "
                    f"{image_where} ({image.shape[2]}x{image.shape[1]})"
                )
            label = torch.from_numpy(self.conventions.convert(raw, label_where))
        return {"image": image, "label": label, "name": name, "path": image_where}


@contextlib.contextmanager
def _names_file(where: str):
    """Attach the file a DatasetError is about (`exc.file`), for the failed dataset's record."""
    try:
        yield
    except DatasetError as exc:
        if getattr(exc, "file", None) is None:
            exc.file = where
        raise
