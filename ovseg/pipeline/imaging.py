"""The one image resize of the pipeline, done exactly as mmcv does it.

Every reference pipeline (mmseg 0.x and 1.x: SCLIP, NACLIP, ClearCLIP, ProxyCLIP, LPOSS, ...) resizes
the *uint8* image with `mmcv.imrescale`, i.e. `cv2.resize(img, (w, h), interpolation=INTER_LINEAR)`
in OpenCV's fixed-point arithmetic, to mmcv's `rescale_size` (`Protocol.resized_size`). A float
resize in torch differs by up to 0.76 grey levels, which moves mIoU by hundredths of a point, so
ovseg resizes with OpenCV on uint8 too: in the dataset workers for `ovseg bench`, and in
`Segmenter.segment` for `ovseg predict` and the Python API.

Float images are first quantised to 8 bits (`round(x * 255)`), the precision of every image file, so
a float and a uint8 copy of the same picture give the same result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ResizedImage", "to_uint8", "resize_uint8"]


@dataclass
class ResizedImage:
    """An image already resized for a protocol, with the size the final label map must have.

    `pixels` is (3, h, w) uint8 RGB; `original_size` is (H, W) of the image as read.
    """

    pixels: torch.Tensor
    original_size: tuple[int, int]


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """A (3, H, W) image as uint8: uint8 unchanged, float in [0, 1] rounded half up from x * 255."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image of shape (3, H, W), got {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image
    if not image.is_floating_point():
        raise ValueError(f"expected a uint8 or float image, got {image.dtype}")
    return (image.float().clamp(0, 1) * 255 + 0.5).floor().to(torch.uint8)


def resize_uint8(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) uint8 resized to `size` = (h, w) with `cv2.resize(..., INTER_LINEAR)`, as `mmcv.imresize`."""
    import cv2

    image = to_uint8(image)
    h, w = int(size[0]), int(size[1])
    if tuple(image.shape[-2:]) == (h, w):
        return image
    array = np.ascontiguousarray(image.detach().cpu().permute(1, 2, 0).numpy())
    out = cv2.resize(array, (w, h), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))).to(image.device)
