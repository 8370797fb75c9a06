"""Lightning engine: one `trainer.predict` per dataset with metrics synced across processes.

`trainer.predict` gives each process a disjoint share of the images (Lightning's unrepeated
sampler), so dataset-level sums are exact under DDP; `self.log` is unavailable in predict hooks, so
metrics are updated in `predict_step` and computed on every rank at epoch end (a collective).

Images are resized in the data loader's workers (`ResizedDataset`: uint8, OpenCV, as mmcv), so a GPU
receives resized images. Precision is ovseg's own (`ovseg.runtime`: the same cast and autocast as
`ovseg predict` and the Python API); the Trainer itself always runs at 32-true.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ovseg.errors import ConfigError, DatasetError
from ovseg.pipeline.protocol import Protocol
from ovseg.pipeline.segmenter import Segmenter, resize_for
from ovseg.pipeline.vocabulary import Vocabulary
from ovseg.runtime import autocast, place

from .metrics import BoundaryIoU, IoU


# predict_step returns None on purpose (metrics only) and the device banners repeat once per dataset
warnings.filterwarnings("ignore", message=".*predict returned None.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
logging.getLogger("lightning.pytorch.accelerators.cuda").setLevel(logging.WARNING)


def _as_list(batch: Any) -> list:
    """Collate that keeps samples apart: images of a dataset differ in size."""
    return list(batch)


class ResizedDataset(Dataset):
    """A dataset whose images arrive resized for `protocol` (`ResizedImage` under "image"), labels and the
    image as read ("original", for pictures) at the original size."""

    def __init__(self, dataset: Dataset, protocol: Protocol):
        self.dataset = dataset
        self.protocol = protocol

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.dataset[index])
        sample["original"] = sample["image"]
        sample["image"] = resize_for(sample["image"], self.protocol)
        return sample


class BenchModule(L.LightningModule):
    """Segments each sample and accumulates mIoU and Boundary IoU for one dataset."""

    def __init__(
        self,
        segmenter: Segmenter,
        vocabulary: Vocabulary,
        ignore_index: int = 255,
        on_sample=None,
        precision: str = "32-true",
    ):
        super().__init__()
        self.segmenter = segmenter
        self.vocabulary = vocabulary
        self.precision = precision
        self.iou = IoU(vocabulary.num_classes, ignore_index=ignore_index)
        self.biou = BoundaryIoU(vocabulary.num_classes, ignore_index=ignore_index)
        self.on_sample = on_sample
        self.results: dict[str, dict[str, torch.Tensor]] | None = None

    def on_predict_start(self) -> None:
        # after Lightning moved the models to their device: the run's precision, then the text embeddings
        place(self.segmenter, self.device, self.precision)
        self.segmenter.set_classes(self.vocabulary)

    def predict_step(self, batch: list[dict], batch_idx: int) -> None:
        for sample in batch:
            with autocast(self.device, self.precision):
                result = self.segmenter.segment(sample["image"])
            target = sample["label"].to(result.labels.device)
            try:
                self.iou.update(result.labels, target)
                self.biou.update(result.labels, target)
            except ValueError as exc:
                raise DatasetError(f"{sample.get('path', sample.get('name', '?'))}: {exc}") from exc
            if self.on_sample is not None:
                self.on_sample(sample, result)
        return None

    def on_predict_epoch_end(self) -> None:
        # compute() all-reduces the states: every rank must call it
        self.results = {"iou": self.iou.compute(), "biou": self.biou.compute()}
        self.iou.reset()
        self.biou.reset()


def make_trainer(
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    logger=None,
    progress: bool = True,
) -> L.Trainer:
    """A Trainer for inference: DDP when more than one device, no checkpoints, no model summary."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    multi = num_nodes > 1 or (isinstance(devices, int) and devices > 1)
    try:
        return L.Trainer(
            accelerator=accelerator,
            devices=devices,
            num_nodes=num_nodes,
            strategy="ddp" if multi else "auto",
            precision="32-true",  # ovseg casts and autocasts itself (ovseg.runtime), as everywhere else
            logger=logger if logger is not None else False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
        )
    except MisconfigurationException as exc:
        raise ConfigError(
            f"--accelerator {accelerator} --devices {devices} --num-nodes {num_nodes}: {exc}"
        ) from exc


def evaluate(
    trainer: L.Trainer, module: BenchModule, dataset: Dataset, num_workers: int = 0
) -> dict[str, dict[str, torch.Tensor]]:
    """Run one dataset through `trainer.predict`; returns the synced metric results."""
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=num_workers, collate_fn=_as_list)
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    assert module.results is not None
    return module.results
