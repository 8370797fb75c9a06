"""Reading images and label maps with PIL, with errors that name the file.

Images of any PIL mode become 8-bit RGB (grayscale, palette, RGBA, CMYK are converted; 16-bit and
float images are rescaled, which `Image.convert` would clip); the EXIF orientation is applied, as
OpenCV's `imread` (mmseg) and detectron2's `read_image` (MESS) do. Label maps keep their stored
values: a palette PNG gives its indices (never colours), 16-bit PNGs their 16-bit values.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ovseg.errors import DatasetError

#: extensions recognised as images when a folder source gives no `image_suffix`
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

_SINGLE_CHANNEL = {"1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N"}


def open_image(source: Any, where: str) -> Image.Image:
    """Open and fully decode a path, bytes, an HF `{"bytes", "path"}` dict or a PIL image."""
    try:
        if isinstance(source, Image.Image):  # e.g. decoded by `datasets`: make sure the pixels load
            source.load()
            return source
        if isinstance(source, dict):  # datasets.Image with decode=False, or a raw struct
            data = source.get("bytes")
            source = io.BytesIO(data) if data is not None else source.get("path")
        elif isinstance(source, (bytes, bytearray)):
            source = io.BytesIO(source)
        if source is None:
            raise ValueError("no image data")
        img = Image.open(source)
        img.load()  # decode now so truncated files fail here, with the file name
        return img
    except FileNotFoundError as exc:
        raise DatasetError(f"{where}: file not found") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{where}: unreadable image ({type(exc).__name__}: {exc})") from exc


_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


def rgb_array(img: Image.Image, where: str, background: tuple[int, int, int] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB from any PIL mode.

    `background` composites transparent pixels onto that colour (what a person sees in a viewer,
    used by `ovseg predict`); None drops the alpha channel as OpenCV's `imread` does for datasets.
    """
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not make the image unreadable
        pass
    if background is not None and (img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img).astype(np.float64)
        if img.mode == "F":  # no fixed range: stretch to [0, 255]
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        else:  # 16-bit range -> 8-bit, 65535 -> 255
            a = np.clip(a, 0, 65535) / 257.0
        gray = np.rint(a).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode != "RGB":
        try:
            img = img.convert("RGB")
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{where}: cannot convert image mode {img.mode} to RGB ({exc})") from exc
    return np.asarray(img)


def label_array(source: Any, where: str) -> np.ndarray:
    """(H, W) integer array of the stored label values."""
    if isinstance(source, (np.ndarray, torch.Tensor, list)):
        a = np.asarray(source)
        if a.ndim == 3 and 1 in (a.shape[0], a.shape[-1]):
            a = a.reshape(a.shape[1:] if a.shape[0] == 1 else a.shape[:-1])
        if a.ndim != 2:
            raise DatasetError(f"{where}: a label map must be 2-D, got shape {a.shape}")
        return a
    img = open_image(source, where)
    if img.mode in _SINGLE_CHANNEL:
        a = np.asarray(img)
        return a.astype(np.uint8) if a.dtype == np.bool_ else a
    if img.mode in ("RGB", "RGBA", "LA"):
        a = np.asarray(img)
        colour = a[..., :3] if img.mode != "LA" else a[..., :1]
        if (colour == colour[..., :1]).all():  # a grey label saved as RGB: the value is the class
            return np.ascontiguousarray(colour[..., 0])
        raise DatasetError(
            f"{where}: the label is a colour image (mode {img.mode}); labels must store class indices in one "
            "channel (grayscale or palette PNG); convert colour-coded masks to indices first"
        )
    raise DatasetError(f"{where}: unsupported label image mode {img.mode}")


def _array_rgb(a: np.ndarray, where: str) -> np.ndarray:
    """(H, W, 3) uint8 from an array column: (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4."""
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4) or a.dtype != np.uint8:
        raise DatasetError(f"{where}: an image array must be uint8 (H, W[, 1|3|4]), got {a.dtype} {a.shape}")
    return np.repeat(a, 3, axis=2) if a.shape[-1] == 1 else a[:, :, :3]


def image_tensor(source: Any, where: str) -> torch.Tensor:
    """(3, H, W) uint8 RGB tensor from a path, bytes, PIL image or array."""
    if isinstance(source, (np.ndarray, torch.Tensor, list)):
        a = _array_rgb(np.asarray(source), where)
    else:
        a = rgb_array(open_image(source, where), where)
    return torch.from_numpy(np.array(a.transpose(2, 0, 1), order="C"))  # one writable copy
