"""Python API for segmenting your own images in three lines.

    from ovseg.api import load_segmenter
    seg = load_segmenter("lposs_plus")
    result = seg.segment(image, ["cow", "grass", "sky, clouds"])   # result.labels, result.scores

`Segmenter.segment` takes the core's (3, H, W) tensors; this module adds the conversion from what
users hold (PIL images of any mode, numpy arrays, files) so that every entry point converts alike.
Every image is resized as the benchmarks' data path does it: uint8 with OpenCV, like mmcv
(`ovseg.pipeline.imaging`); a float image in [0, 1] is first quantised to 8 bits (round(x * 255)).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from .evaluation.data.io import IMAGE_EXTENSIONS, open_image, rgb_array
from .errors import ConfigError
from .pipeline.segmenter import ResizedImage, Segmentation, Segmenter
from .pipeline.vocabulary import Vocabulary
from .runtime import autocast, check_precision, module_device, place, resolve_device

#: files `ovseg predict` picks from a folder: the dataset image types plus formats people keep photos in
IMAGE_SUFFIXES = IMAGE_EXTENSIONS + (".gif", ".ppm", ".pgm", ".pnm")
WHITE = (255, 255, 255)


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Integer or float pixel values to uint8 by their type's range (16-bit /257, float [0,1] x255)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and float(np.nanmax(arr)) > 1.0:
            raise ConfigError(
                f"float images must hold values in [0, 1], got a maximum of {float(np.nanmax(arr)):.3g}; "
                "pass uint8 values or divide by 255"
            )
        return np.clip(np.nan_to_num(arr) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        top = int(arr.max()) if arr.size else 0
        if top <= 255 and arr.dtype.itemsize > 2:
            return np.clip(arr, 0, 255).astype(np.uint8)  # 32-bit integer arrays holding 8-bit data
        if top <= 65535:
            return ((np.clip(arr, 0, 65535).astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return (np.clip(arr, 0, None).astype(np.float64) / top * 255 + 0.5).astype(np.uint8)
    raise ConfigError(f"unsupported pixel type {arr.dtype}")


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB, upright by its EXIF orientation, transparency on white.

    Decoded by the same code as dataset images (`ovseg.evaluation.data.io`); raises DatasetError naming the file
    when it is missing or unreadable.
    """
    return rgb_array(open_image(path, str(path)), str(path), background=WHITE)


def as_image_tensor(image) -> torch.Tensor:
    """A (3, H, W) uint8 or float tensor from a PIL image, a numpy array, a tensor or a file path.

    numpy arrays are (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (alpha dropped), uint8, uint16 or
    float in [0, 1]; tensors are (3, H, W) as the core expects ((H, W) and (1, H, W) are repeated to
    three channels, a 4th channel is dropped).
    """
    if isinstance(image, (str, Path)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        image = rgb_array(image, "image", background=WHITE)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
            arr = arr[..., :3]
        elif arr.ndim != 2:
            raise ConfigError(f"expected an (H, W) or (H, W, 3) image array, got shape {arr.shape}")
        arr = _scale_to_uint8(arr)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        return torch.from_numpy(np.array(arr.transpose(2, 0, 1), order="C"))  # one writable copy
    if isinstance(image, torch.Tensor):
        t = image
        if t.ndim == 2:
            t = t[None]
        if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
            raise ConfigError(
                f"expected a (3, H, W) image tensor, got shape {tuple(image.shape)} "
                "(an (H, W, 3) array should be passed as numpy or permuted first)"
            )
        t = t[:3]
        return t.expand(3, -1, -1) if t.shape[0] == 1 else t
    raise ConfigError(f"cannot segment an object of type {type(image).__name__}: pass a PIL image, numpy array, tensor or path")


def as_vocabulary(classes) -> Vocabulary | None:
    """Class list, CLI-style string (`"cow; grass; sky, clouds"`) or Vocabulary, as a Vocabulary."""
    if classes is None or isinstance(classes, Vocabulary):
        return classes
    if isinstance(classes, str):
        return Vocabulary.parse(classes)
    return Vocabulary(classes)


class ImageSegmenter(Segmenter):
    """A `Segmenter` whose `segment` also takes PIL images, numpy arrays, paths and class strings, and
    runs under the precision it was placed with (`*-mixed`: autocast around every call)."""

    precision: str = "32-true"

    @torch.no_grad()
    def segment(self, image, classes: Vocabulary | Sequence | str | None = None) -> Segmentation:
        vocabulary = as_vocabulary(classes)
        if vocabulary is not None and self.vocabulary is not None and vocabulary.class_names == self.vocabulary.class_names:
            vocabulary = self.vocabulary  # same classes: keep the cached text embeddings
        if not isinstance(image, ResizedImage):
            image = as_image_tensor(image)
        with autocast(module_device(self), self.precision):
            return super().segment(image, vocabulary)


def load_segmenter(
    method: str | Path | None = None,
    overrides: Iterable[str] = (),
    *,
    predictor: str | None = None,
    extractor: str | None = None,
    refiner: str | None = None,
    device: str | torch.device | None = "auto",
    precision: str = "32-true",
) -> ImageSegmenter:
    """Build a method (a name in configs/methods or a YAML path; default lposs_plus) for your images.

    `overrides` are the CLI's `key=value` pairs (`refiner.k=200`, `protocol.short_side=336`);
    `predictor`/`extractor`/`refiner` replace a stage as `--predictor` etc. do; `device` is `auto`,
    `cpu`, `gpu`, `mps` or a torch device; `precision` as `--precision` (`ovseg.runtime`).
    """
    from .evaluation.methods import dataset_protocol, resolve_method

    cfg, protocol_overrides = resolve_method(method, overrides, predictor=predictor, extractor=extractor,
                                             refiner=refiner)
    return from_config(cfg, dataset_protocol(cfg, final=protocol_overrides), device, precision)


def from_config(cfg, protocol, device="auto", precision: str = "32-true") -> ImageSegmenter:
    """An `ImageSegmenter` for a resolved method config and protocol, placed on `device`."""
    from .evaluation.methods import build_segmenter

    base = build_segmenter(cfg, protocol)
    seg = ImageSegmenter(base.predictor, base.refiner, base.extractor, base.protocol)
    seg.method_config = cfg  # kept for reference (name, parameters)
    seg.precision = check_precision(precision)
    seg.eval()
    return place(seg, resolve_device(device), seg.precision)
