"""Example pictures of a bench run (`--save-examples N`): image | prediction | ground truth of the first
N images of each dataset, `examples/<dataset>/<image>.png`, each written atomically.

Under DDP every process writes the pictures of the images it segments, chosen by image index, so a
run on N processes writes the same pictures as one process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ovseg.visualize import RANDOM_WEIGHTS_BANNER, example_picture

from ovseg.atomic import atomic_path


def example_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob("*.png") if not p.name.startswith("."))


class ExampleWriter:
    """Writes `<folder>/<image name>.png` for the samples of index < `limit`."""

    def __init__(self, folder: Path, class_names: list[str], ignore_index: int, limit: int,
                 title: str = "", random_weights: bool = False):
        self.folder = Path(folder)
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        self.limit = limit
        self.title = title
        self.banner = RANDOM_WEIGHTS_BANNER if random_weights else None

    def __call__(self, sample: dict, result) -> None:
        if sample["index"] >= self.limit:
            return
        image = sample.get("original", sample["image"]).permute(1, 2, 0).cpu().numpy().astype(np.uint8)
        name = Path(str(sample.get("name", sample["index"]))).name
        picture = example_picture(image, result.labels.cpu(), sample["label"].cpu(), self.class_names,
                                  self.ignore_index, title=f"{self.title} · {name}" if self.title else name,
                                  banner=self.banner)
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / f"{name}.png") as tmp:
            picture.save(tmp, format="PNG")
