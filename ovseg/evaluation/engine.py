"""Lightning engine: one `trainer.predict` per dataset with metrics synced across processes.

`trainer.predict` gives each process a disjoint share of the images (Lightning's unrepeated
sampler), so dataset-level sums are exact under DDP; `self.log` is unavailable in predict hooks, so
metrics are updated in `predict_step` and computed on every rank at epoch end (a collective).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ovseg.errors import ConfigError, DatasetError
from .metrics import BoundaryIoU, IoU
from ovseg.pipeline.segmenter import Segmenter
from ovseg.pipeline.vocabulary import Vocabulary


# predict_step returns None on purpose (metrics only) and the device banners repeat once per dataset
warnings.filterwarnings("ignore", message=".*predict returned None.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
logging.getLogger("lightning.pytorch.accelerators.cuda").setLevel(logging.WARNING)


def _as_list(batch: Any) -> list:
    """Collate that keeps samples apart: images of a dataset differ in size."""
    return list(batch)


class BenchModule(L.LightningModule):
    """Segments each sample and accumulates mIoU and Boundary IoU for one dataset."""

    def __init__(self, segmenter: Segmenter, vocabulary: Vocabulary, ignore_index: int = 255, on_sample=None):
        super().__init__()
        self.segmenter = segmenter
        self.vocabulary = vocabulary
        self.iou = IoU(vocabulary.num_classes, ignore_index=ignore_index)
        self.biou = BoundaryIoU(vocabulary.num_classes, ignore_index=ignore_index)
        self.on_sample = on_sample
        self.results: dict[str, dict[str, torch.Tensor]] | None = None

    def on_predict_start(self) -> None:
        # text embeddings are encoded here, after Lightning moved the models to their device
        self.segmenter.set_classes(self.vocabulary)

    def predict_step(self, batch: list[dict], batch_idx: int) -> None:
        for sample in batch:
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
    precision: str = "32-true",
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
            precision=precision,
            logger=logger if logger is not None else False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
        )
    except MisconfigurationException as exc:
        raise ConfigError(
            f"--accelerator {accelerator} --devices {devices} --num-nodes {num_nodes} --precision {precision}: {exc}"
        ) from exc


def evaluate(
    trainer: L.Trainer, module: BenchModule, dataset: Dataset, num_workers: int = 0
) -> dict[str, dict[str, torch.Tensor]]:
    """Run one dataset through `trainer.predict`; returns the synced metric results."""
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=num_workers, collate_fn=_as_list)
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    assert module.results is not None
    return module.results
