"""Pictures of label maps: a fixed palette, palette PNGs and overlays with a legend.

The palette depends only on the class index, so class 3 has the same colour in every label PNG,
overlay and run; label PNGs store the class index itself (viewers show the colour, tools read the
index), which keeps them lossless and machine-readable.
"""

from __future__ import annotations

import colorsys
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Kelly's colours of maximum contrast (white and black left out): the first 20 classes, which are
# the ones most images show, get colours people tell apart at a glance.
_KELLY = [
    0xF3C300, 0x875692, 0xF38400, 0xA1CAF1, 0xBE0032, 0xC2B280, 0x848482, 0x008856, 0xE68FAC, 0x0067A5,
    0xF99379, 0x604E97, 0xF6A600, 0xB3446C, 0xDCD300, 0x882D17, 0x8DB600, 0x654522, 0xE25822, 0x2B3D26,
]
_GOLDEN = 0.618033988749895


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours; entry i is the same for every n.

    After Kelly's 20 colours, hues step by the golden ratio (never repeating) while saturation and
    brightness cycle through three levels each, so neighbouring indices stay far apart.
    """
    if n < 0:
        raise ValueError(f"palette size must be non-negative, got {n}")
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        if i < len(_KELLY):
            c = _KELLY[i]
            out[i] = ((c >> 16) & 255, (c >> 8) & 255, c & 255)
        else:
            j = i - len(_KELLY)
            h = (0.05 + j * _GOLDEN) % 1.0
            s = (0.9, 0.6, 0.75)[j % 3]
            v = (0.95, 0.72, 0.5)[(j // 3) % 3]
            out[i] = [round(255 * x) for x in colorsys.hsv_to_rgb(h, s, v)]
    return out


def _to_numpy(labels) -> np.ndarray:
    arr = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(f"expected a label map of shape (H, W), got {arr.shape}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"label maps hold class indices >= 0, got {int(arr.min())}")
    return arr


def label_png(labels) -> Image.Image:
    """A label map (H, W) as a palette ('P') image whose pixel values are the class indices.

    More than 256 classes do not fit a palette image: the map is then a 16-bit greyscale image
    (values are still the indices, without colours).
    """
    arr = _to_numpy(labels)
    top = int(arr.max()) if arr.size else 0
    if top < 256:
        img = Image.fromarray(arr.astype(np.uint8))  # "L"; putpalette turns it into "P"
        img.putpalette(palette(256).tobytes())
        return img
    if top < 65536:
        return Image.fromarray(arr.astype(np.uint16))
    raise ValueError(f"label value {top} does not fit a 16-bit PNG")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _legend_entries(labels: np.ndarray, class_names: Sequence[str]) -> list[tuple[int, str]]:
    present = np.unique(labels)
    entries = []
    for i in present.tolist():
        name = class_names[i] if i < len(class_names) else f"class {i}"
        if len(name) > 40:
            name = name[:37] + "..."
        entries.append((i, name))
    return entries


def _draw_legend(entries, font, colours, max_extent: int, below: bool) -> Image.Image:
    """A white panel with a grid of swatch + name entries, in class order.

    `below`: as many columns as fit in `max_extent` pixels of width, filled row by row; otherwise
    as many rows as fit in `max_extent` pixels of height, filled column by column.
    """
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (11, 3)
    line = ascent + descent
    swatch = line
    pad, gap = max(4, line // 3), max(8, line // 2)
    col_w = max(swatch + pad + int(np.ceil(font.getlength(name))) for _, name in entries)
    step_x, step_y = col_w + gap, line + pad
    n = len(entries)
    if below:
        ncols = max(1, min(n, (max_extent - 2 * pad + gap) // step_x))
        nrows = -(-n // ncols)
        cells = [(k // ncols, k % ncols) for k in range(n)]
    else:
        nrows = max(1, min(n, (max_extent - 2 * pad + pad) // step_y))
        ncols = -(-n // nrows)
        cells = [(k % nrows, k // nrows) for k in range(n)]
    width = 2 * pad + ncols * step_x - gap
    height = 2 * pad + nrows * step_y - pad
    panel = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(panel)
    for (row, col), (i, name) in zip(cells, entries):
        x, y = pad + col * step_x, pad + row * step_y
        draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=tuple(int(c) for c in colours[i]), outline=(0, 0, 0))
        draw.text((x + swatch + pad, y), name, fill=(0, 0, 0), font=font)
    return panel


def _boundaries(labels: np.ndarray) -> np.ndarray:
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    return edge


def overlay(image_uint8, labels, class_names: Sequence[str], alpha: float = 0.5, boundaries: bool = True) -> Image.Image:
    """The image with class colours blended in (`alpha` = colour weight) and a legend beside it.

    `image_uint8` is (H, W, 3) uint8 (a PIL RGB image works too); `labels` (H, W) indexes
    `class_names`. The legend lists only the classes present, in class order; it goes below or to
    the right of the picture (whichever gives the smaller canvas), never over it. `boundaries` draws
    the region borders in white so that touching regions of similar colour stay apart.
    """
    img = np.asarray(image_uint8)
    lab = _to_numpy(labels)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {img.shape} {img.dtype}")
    if img.shape[:2] != lab.shape:
        raise ValueError(f"image {img.shape[:2]} and labels {lab.shape} differ in size")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colours = palette(int(lab.max()) + 1 if lab.size else 1)
    blend = (1.0 - alpha) * img.astype(np.float32) + alpha * colours[lab].astype(np.float32)
    out = np.clip(blend + 0.5, 0, 255).astype(np.uint8)
    if boundaries:
        out[_boundaries(lab)] = 255
    picture = Image.fromarray(out)
    entries = _legend_entries(lab, class_names)
    if not entries:
        return picture
    h, w = lab.shape
    font = _font(max(14, min(64, round(max(h, w) / 32))))
    below_panel = _draw_legend(entries, font, colours, w, below=True)
    right_panel = _draw_legend(entries, font, colours, h, below=False)
    below_size = (max(w, below_panel.width), h + below_panel.height)
    right_size = (w + right_panel.width, max(h, right_panel.height))
    # the placement that wastes less space; a tie goes below a landscape image, beside a portrait one
    below_area, right_area = below_size[0] * below_size[1], right_size[0] * right_size[1]
    if below_area < right_area or (below_area == right_area and w >= h):
        canvas = Image.new("RGB", below_size, "white")
        canvas.paste(picture, (0, 0))
        canvas.paste(below_panel, (0, h))
    else:
        canvas = Image.new("RGB", right_size, "white")
        canvas.paste(picture, (0, 0))
        canvas.paste(right_panel, (w, 0))
    return canvas
