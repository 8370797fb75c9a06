"""Qualitative PNGs for a bench run: prediction and ground truth overlays side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ovseg.visualize import overlay


class ExampleWriter:
    """Writes `<folder>/<sample name>.png` for the first `limit` samples a process segments."""

    def __init__(self, folder: Path, class_names: list[str], ignore_index: int, limit: int):
        self.folder = Path(folder)
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        self.limit = limit
        self.written = 0

    def __call__(self, sample: dict, result) -> None:
        if self.written >= self.limit:
            return
        image = sample.get("original", sample["image"]).permute(1, 2, 0).cpu().numpy().astype(np.uint8)
        target = sample["label"].cpu().clone()
        # ignored pixels get their own legend entry instead of an out-of-range colour index
        names = self.class_names + ["(ignored)"]
        target[target == self.ignore_index] = len(self.class_names)
        pred = overlay(image, result.labels.cpu().to(torch.int64), self.class_names)
        truth = overlay(image, target, names)
        canvas = Image.new("RGB", (pred.width + truth.width + 8, max(pred.height, truth.height)), "white")
        canvas.paste(pred, (0, 0))
        canvas.paste(truth, (pred.width + 8, 0))
        self.folder.mkdir(parents=True, exist_ok=True)
        canvas.save(self.folder / f"{Path(str(sample.get('name', self.written))).name}.png")
        self.written += 1
