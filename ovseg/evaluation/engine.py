"""Lightning engine: one `trainer.predict` per dataset with metrics synced across processes.

Every process takes a disjoint share of the images (`ShareSampler`: i, i + W, i + 2W, ...), so
dataset-level sums are exact under DDP. A process whose share is empty (fewer images than processes)
gets one placeholder item, so every process runs the same loop and reaches the same collectives.
`self.log` is unavailable in predict hooks: metrics are updated in `predict_step` and computed on
every rank at epoch end (a collective).

Nothing a sample does may stop one process alone (the others would wait in the collective for
ever): a sample that cannot be read (`DatasetError`: unreadable image, label out of range, size
mismatch) or fails in the model is recorded, the process skips its remaining samples, and at epoch
end the first failure (lowest image index) is shared with every process. The bench records the
dataset as failed and goes on.

Images are resized in the data loader's workers (`ResizedDataset`: uint8, OpenCV, as mmcv), so a GPU
receives resized images. Precision is ovseg's own (`ovseg.runtime`: the same cast and autocast as
`ovseg predict` and the Python API); the Trainer itself always runs at 32-true.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from ovseg.errors import ConfigError, DatasetError
from ovseg.pipeline.protocol import Protocol
from ovseg.pipeline.segmenter import Segmenter, resize_for
from ovseg.pipeline.vocabulary import Vocabulary
from ovseg.runtime import autocast, place

from .cost import StageClock, peak_memory, reset_peak_memory
from .interrupt import reinstall, reset_in_worker
from .metrics import BoundaryIoU, IoU
from .rundir import Cost

# predict_step returns None on purpose (metrics only) and the device banners repeat once per dataset
warnings.filterwarnings("ignore", message=".*predict returned None.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
# a process whose share was a placeholder computes (and syncs) metrics it never updated
warnings.filterwarnings("ignore", message=".*compute.* was called before the .*update.*")
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
logging.getLogger("lightning.pytorch.accelerators.cuda").setLevel(logging.WARNING)


def _as_list(batch: Any) -> list:
    """Collate that keeps samples apart: images of a dataset differ in size."""
    return list(batch)


@dataclass
class Failure:
    """Why a dataset could not be evaluated: `malformed` data (a file named) or an `error` in the model."""

    index: int
    kind: str  # malformed | error
    reason: str
    file: str | None = None
    traceback: str | None = None


def failure_of(exc: BaseException, index: int, file: str | None = None) -> Failure:
    if isinstance(exc, DatasetError):
        return Failure(index, "malformed", str(exc), getattr(exc, "file", None) or file)
    return Failure(index, "error", f"{type(exc).__name__}: {exc}", file, traceback.format_exc())


class ResizedDataset(Dataset):
    """A dataset whose images arrive resized for `protocol` (`ResizedImage` under "image"), labels and the
    image as read ("original", for pictures) at the original size, the index and the loading time.

    Index -1 is the placeholder of a process without images; a sample that cannot be read comes back
    as its `Failure` (raising in a data-loading worker would stop this process alone)."""

    def __init__(self, dataset: Dataset, protocol: Protocol):
        self.dataset = dataset
        self.protocol = protocol

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            return {"placeholder": True}
        start = time.perf_counter()
        try:
            sample = dict(self.dataset[index])
            sample["original"] = sample["image"]
            sample["image"] = resize_for(sample["image"], self.protocol)
        except Exception as exc:  # noqa: BLE001 - recorded as the dataset's failure, see the module docstring
            return {"index": index, "failure": failure_of(exc, index)}
        sample["index"] = index
        sample["load_s"] = time.perf_counter() - start
        return sample


class ShareSampler(Sampler[int]):
    """This process's share of [0, n): rank, rank + world, ...; [-1] (a placeholder) when that is empty.

    Rank and world size are read when the loader iterates, inside `trainer.predict`, where Lightning
    has set up the process group."""

    def __init__(self, n: int):
        self.n = n

    def _share(self) -> list[int]:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        return list(range(rank, self.n, world)) or [-1]

    def __iter__(self):
        return iter(self._share())

    def __len__(self) -> int:
        return len(self._share())


class SignalCallback(L.Callback):
    """Keeps ovseg's stop handler during `trainer.predict`, where Lightning installs its own SIGTERM handler."""

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reinstall(trainer.strategy.launcher)


@dataclass
class Outcome:
    """What one dataset gave, the same on every process."""

    results: dict[str, dict[str, torch.Tensor]] | None  # None when `failure`
    failure: Failure | None
    num_images: int
    cost: Cost


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
        self.outcome: Outcome | None = None
        self.failure: Failure | None = None
        self._clock: StageClock | None = None

    def on_predict_start(self) -> None:
        # after Lightning moved the models to their device: the run's precision, then the text embeddings
        place(self.segmenter, self.device, self.precision)
        self.segmenter.set_classes(self.vocabulary)
        self.failure: Failure | None = None
        self.images, self.data_s, self.total_s = 0, 0.0, 0.0
        reset_peak_memory(self.device)
        self._clock = StageClock(self.segmenter).attach()

    def predict_step(self, batch: list[dict], batch_idx: int) -> None:
        for sample in batch:
            if sample.get("placeholder") or self.failure is not None:
                continue  # after a failure the dataset is lost: skip the rest of this share quickly
            if "failure" in sample:
                self.failure = sample["failure"]
                continue
            start = time.perf_counter()
            try:
                self._segment(sample)
            except Exception as exc:  # noqa: BLE001 - recorded, see the module docstring
                if os.environ.get("OVSEG_DEBUG"):
                    raise
                self.failure = failure_of(exc, sample["index"], sample.get("path"))
                continue
            self.images += 1
            self.data_s += sample["load_s"]
            self.total_s += time.perf_counter() - start + sample["load_s"]
        return None

    def _segment(self, sample: dict) -> None:
        with autocast(self.device, self.precision):
            result = self.segmenter.segment(sample["image"])
        target = sample["label"].to(result.labels.device)
        self.iou.update(result.labels, target)
        self.biou.update(result.labels, target)
        if self.on_sample is not None:
            self.on_sample(sample, result)

    def on_predict_epoch_end(self) -> None:
        # collectives: every rank calls each of them, in the same order
        clock, self._clock = self._clock, None
        clock.detach()
        strategy = self.trainer.strategy
        failure = self._shared_failure(strategy)
        results = {"iou": self.iou.compute(), "biou": self.biou.compute()}
        self.iou.reset()
        self.biou.reset()
        sums = torch.tensor([self.images, self.data_s, clock.seconds["model"], clock.seconds["refiner"],
                             self.total_s], dtype=torch.float64, device=self.device)
        rss, gpu = peak_memory(self.device)
        peaks = torch.tensor([rss, -1.0 if gpu is None else gpu], dtype=torch.float64, device=self.device)
        if strategy.world_size > 1:  # seconds add up over processes; memory is the busiest process's
            sums = strategy.reduce(sums, reduce_op="sum")
            peaks = strategy.reduce(peaks, reduce_op=dist.ReduceOp.MAX)
        images = int(sums[0].item())
        per = [v / images if images else None for v in sums[1:].tolist()]
        cost = Cost(*per, peak_rss_mb=round(peaks[0].item(), 1),
                    peak_gpu_mb=None if peaks[1].item() < 0 else round(peaks[1].item(), 1))
        self.outcome = Outcome(None if failure else results, failure, images, cost)

    def _shared_failure(self, strategy) -> Failure | None:
        """The failure of lowest image index over all processes, known to all of them."""
        if strategy.world_size == 1:
            return self.failure
        none = torch.iinfo(torch.int64).max
        mine = self.failure.index if self.failure else none
        first = int(strategy.reduce(torch.tensor(mine, device=self.device), reduce_op=dist.ReduceOp.MIN).item())
        if first == none:
            return None
        owner = torch.tensor(strategy.global_rank if mine == first else -1, device=self.device)
        owner = int(strategy.reduce(owner, reduce_op=dist.ReduceOp.MAX).item())  # shares are disjoint: one owner
        return strategy.broadcast(self.failure, src=owner)


def make_trainer(
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    logger=None,
    progress: bool = True,
) -> L.Trainer:
    """A Trainer for inference: DDP when more than one device, no checkpoints, no model summary.

    The loader's sampler is ovseg's own (`ShareSampler`), so Lightning must not replace it."""
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
            use_distributed_sampler=False,
            callbacks=[SignalCallback()],
        )
    except (MisconfigurationException, ValueError) as exc:
        raise ConfigError(
            f"--accelerator {accelerator} --devices {devices} --num-nodes {num_nodes}: {exc}"
        ) from exc


def evaluate(trainer: L.Trainer, module: BenchModule, dataset: Dataset, num_workers: int = 0) -> Outcome:
    """Run one dataset through `trainer.predict`; returns the synced outcome (the same on every rank)."""
    loader = DataLoader(dataset, batch_size=1, sampler=ShareSampler(len(dataset)), num_workers=num_workers,
                        collate_fn=_as_list, worker_init_fn=reset_in_worker if num_workers > 0 else None)
    module.outcome = None
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    assert module.outcome is not None
    return module.outcome
