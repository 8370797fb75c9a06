"""Datasets for evaluation: sources (folder, Hugging Face, demo), label conventions, checks.

Every source yields `{"image": uint8 (3, H, W) RGB, "label": int64 (H, W), "name": str, "path": str}`
with the label conventions applied and validated; errors are `DatasetError`s naming the file
(`MissingDataError` when the data is not there at all).
"""

from .base import MissingDataError, SegmentationDataset
from .check import MALFORMED, MISSING, DatasetStatus, check_dataset, problem_kind
from .conventions import LabelConventions
from .folder import FolderDataset
from .hf import HFDataset
from .sources import DemoSource, FolderSource, HFSource, parse_source, resolve_root

__all__ = [
    "SegmentationDataset", "FolderDataset", "HFDataset", "LabelConventions", "MissingDataError",
    "FolderSource", "HFSource", "DemoSource", "parse_source", "resolve_root", "check_dataset", "DatasetStatus",
    "problem_kind", "MISSING", "MALFORMED",
]
