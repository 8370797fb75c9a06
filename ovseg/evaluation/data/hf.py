"""Hugging Face `datasets` source: a `save_to_disk` folder, parquet file(s), or a hub id.

Rows are decoded one at a time (`Image` features decode on access), so nothing is loaded up front.
Mask columns stored as `Image` keep their mode: palette/grayscale masks give their indices.
"""

from __future__ import annotations

import os
from pathlib import Path

from ovseg.errors import DatasetError
from .base import MissingDataError, SegmentationDataset
from .conventions import LabelConventions


def _is_saved_dataset(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json"))


def _load(path: str, local: Path | None, split: str | None, config: str | None, revision: str | None):
    import datasets

    if local is not None and local.is_dir() and _is_saved_dataset(local):
        return datasets.load_from_disk(str(local))
    if local is not None and local.is_dir():
        if not any(local.rglob("*.parquet")):
            raise DatasetError(f"{local}: neither a `save_to_disk` folder nor a folder of parquet files")
        # split names come from the file names (validation-00000-of-00001.parquet, data/test-*.parquet)
        return datasets.load_dataset("parquet", data_dir=str(local))
    if local is not None:
        return datasets.load_dataset("parquet", data_files={split or "train": str(local)})
    return datasets.load_dataset(path, name=config, split=split, revision=revision)


class HFDataset(SegmentationDataset):
    """One split of a `datasets` dataset with an image column and a mask column."""

    def __init__(
        self,
        path: str,
        split: str | None = None,
        image_column: str = "image",
        label_column: str = "label",
        name_column: str | None = None,
        config: str | None = None,
        revision: str | None = None,
        data_root: str | os.PathLike | None = None,
        conventions: LabelConventions | None = None,
    ):
        super().__init__(conventions or LabelConventions(256))
        local = self._local_path(path, data_root)
        self.where = str(local) if local is not None else f"hub dataset {path!r}"
        try:
            ds = _load(path, local, split, config, revision)
        except DatasetError:
            raise
        except Exception as exc:  # noqa: BLE001 - datasets raises many types (network, format, FileNotFound)
            kind = MissingDataError if local is None else DatasetError
            raise kind(f"{self.where}: could not be loaded with `datasets` ({type(exc).__name__}: {exc})") from exc

        if isinstance(ds, dict):  # a DatasetDict: pick the split
            splits = sorted(ds.keys())
            if split is None and len(splits) == 1:
                split = splits[0]
            if split not in splits:
                raise DatasetError(
                    f"{self.where}: " + ("choose a split" if split is None else f"no split {split!r}")
                    + f"; available splits: {', '.join(splits)}"
                )
            ds = ds[split]
        self.split = split
        for what, col in (("image_column", image_column), ("label_column", label_column), ("name_column", name_column)):
            if col is not None and col not in ds.column_names:
                raise DatasetError(
                    f"{self.where}{f' split {split}' if split else ''}: no column {col!r} ({what}); "
                    f"columns: {', '.join(ds.column_names)}"
                )
        self.dataset = ds
        self.image_column, self.label_column, self.name_column = image_column, label_column, name_column

    @staticmethod
    def _local_path(path: str, data_root) -> Path | None:
        """A local path when `path` exists (relative to the data root or as given), None for a hub id."""
        p = Path(path).expanduser()
        candidates = [p] if p.is_absolute() else ([Path(data_root) / p] if data_root else []) + [p]
        for c in candidates:
            if c.exists():
                return c
        if p.is_absolute() or path.startswith(".") or p.suffix == ".parquet" or path.count("/") > 1:
            raise MissingDataError(f"{candidates[0]} does not exist")
        return None

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, index: int):
        row = self.dataset[index]
        where = f"{self.where}{f' split {self.split}' if self.split else ''} row {index}"
        name = str(row[self.name_column]) if self.name_column else f"{index:06d}"
        return (row[self.image_column], row[self.label_column], name,
                f"{where} column {self.image_column!r}", f"{where} column {self.label_column!r}")
