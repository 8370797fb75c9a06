"""Label conventions: turn the values stored in a label file into evaluation labels.

Order (mmseg's): `label_map` {from: to} first, then `reduce_zero_label` (0 -> ignore, k -> k-1,
ignore stays ignore; with ignore 255 this is exactly mmseg's uint8 `label[label==0]=255; label-=1;
label[label==254]=255`). Both are folded into one lookup table over the raw values, so converting
an image is a single vectorised gather. Values outside [0, C) that are not `ignore_index` are an
error naming the file: a wrong convention must never be scored silently.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ovseg.errors import DatasetError

#: raw values up to this go through a lookup table; larger ones (32-bit labels) through np.unique
_LUT_LIMIT = 1 << 16


def _list(values, limit: int = 10) -> str:
    values = [int(v) for v in values]
    return ", ".join(map(str, values[:limit])) + (f", ... ({len(values)} values)" if len(values) > limit else "")


class LabelConventions:
    """How raw label values map to classes [0, num_classes) and `ignore_index`."""

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        reduce_zero_label: bool = False,
        label_map: Mapping[int, int] | None = None,
    ):
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.label_map = {int(k): int(v) for k, v in (label_map or {}).items()}
        self._lut: np.ndarray | None = None

    def __repr__(self) -> str:
        return (f"LabelConventions(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
                f"reduce_zero_label={self.reduce_zero_label}, label_map={self.label_map})")

    def map_values(self, values: np.ndarray) -> np.ndarray:
        """Apply label_map then reduce_zero_label to an array of raw values (vectorised)."""
        raw = np.asarray(values, dtype=np.int64)
        out = raw.copy()
        for src, dst in self.label_map.items():
            out[raw == src] = dst
        if self.reduce_zero_label:
            reduced = out - 1
            reduced[(out == 0) | (out == self.ignore_index)] = self.ignore_index
            out = reduced
        return out

    def _table(self) -> np.ndarray:
        if self._lut is None:
            self._lut = self.map_values(np.arange(_LUT_LIMIT))
        return self._lut

    def convert(self, raw: np.ndarray, where: str) -> np.ndarray:
        """Raw label array (any integer dtype) -> int64 labels; DatasetError naming `where` if out of range."""
        raw = np.asarray(raw)
        if raw.dtype.kind not in "ui" and raw.dtype != np.bool_:
            raise DatasetError(f"{where}: label values must be integers, got dtype {raw.dtype}")
        if raw.size == 0:
            return raw.astype(np.int64)
        lo, hi = int(raw.min()), int(raw.max())
        if lo >= 0 and hi < _LUT_LIMIT:
            label = self._table()[raw.astype(np.intp, copy=False)]
        else:
            uniq, inverse = np.unique(raw, return_inverse=True)
            label = self.map_values(uniq)[inverse].reshape(raw.shape)
        bad = ((label < 0) | (label >= self.num_classes)) & (label != self.ignore_index)
        if bad.any():
            raise DatasetError(
                f"{where}: label values {_list(np.unique(label[bad]))} are outside [0, {self.num_classes}) and not "
                f"ignore_index {self.ignore_index} (raw values in the file: {_list(np.unique(raw[bad]))}; "
                f"conventions: reduce_zero_label={self.reduce_zero_label}, label_map={self.label_map or '{}'}); "
                "check the class list and the label conventions of this dataset"
            )
        return label
